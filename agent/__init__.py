"""
The zcontrol agent: the host side, deployable without the management node (it never imports
C{zcontrol}). C{twistd zagent} runs one process serving many (simulated) hosts; see
L{agent.protocol} for the wire contract and L{agent.tap} for the options.
"""

__all__ = ["app", "protocol", "tap"]
