"""Moving values between ranks: global row numbering (`layout`), one value's leaves as row
slices and sends (`routing`), every point-to-point message of a pass in posting order
(`messages`), gathers of state (`collectives`), and joining the process group (`distenv`)."""

from autopart.runtime.transport.collectives import gather, stream_to_rank0, to_cpu
from autopart.runtime.transport.distenv import ensure_initialized
from autopart.runtime.transport.layout import BatchLayout, Rows, Transfer, transfers
from autopart.runtime.transport.messages import Inbox, Messages

__all__ = [
    "BatchLayout",
    "Inbox",
    "Messages",
    "Rows",
    "Transfer",
    "ensure_initialized",
    "gather",
    "stream_to_rank0",
    "to_cpu",
    "transfers",
]
