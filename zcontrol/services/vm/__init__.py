"""
The VM service package: the VM state machine (L{zcontrol.services.vm.states}) and its error
codes (L{zcontrol.services.vm.errors}); the service itself comes with issue 10.
"""
