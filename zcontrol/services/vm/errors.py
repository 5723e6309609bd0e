# -*- test-case-name: tests.test_vm_states -*-
"""
The VM error codes: ZStack's C{VmErrors} (C{header/vm/VmErrors.java}, C{VM.1000} to
C{VM.1013}) plus C{VM.1100}, a VM-specific not-found code that ZStack does not have (it answers
C{SYS.1003} there).
"""

from __future__ import annotations

from zcontrol.core.errors import register_codes

__all__ = ["VM"]


class VM:
    """
    The C{VM.xxxx} codes, with ZStack's C{VmErrors} names.
    """

    _codes = register_codes(
        "VM",
        {
            1000: "Unable to create the VM instance",
            1001: "Unable to start the VM instance",
            1002: "Unable to stop the VM instance",
            1003: "Unable to reboot the VM instance",
            1004: "Unable to destroy the VM instance",
            1005: "Unable to attach the volume to the VM instance",
            1006: "Unable to detach the volume from the VM instance",
            1007: "Unable to attach the network to the VM instance",
            1008: "Unable to migrate the VM instance",
            1009: "Unable to allocate a MAC address",
            1010: "The VM instance is not in a state that allows the operation",
            1011: "Unable to change the VM instance's password",
            1012: "Unable to pause the VM instance",
            1013: "Unable to resume the VM instance",
            1100: "No such VM instance",
        },
    )
    CREATE_ERROR = _codes[1000]
    START_ERROR = _codes[1001]
    STOP_ERROR = _codes[1002]
    REBOOT_ERROR = _codes[1003]
    DESTROY_ERROR = _codes[1004]
    ATTACH_VOLUME_ERROR = _codes[1005]
    DETACH_VOLUME_ERROR = _codes[1006]
    ATTACH_NETWORK_ERROR = _codes[1007]
    MIGRATE_ERROR = _codes[1008]
    ALLOCATE_MAC_ERROR = _codes[1009]
    NOT_IN_CORRECT_STATE = _codes[1010]
    CHANGE_VM_PASSWORD_ERROR = _codes[1011]
    SUSPEND_ERROR = _codes[1012]
    RESUME_ERROR = _codes[1013]
    NOT_FOUND = _codes[1100]
