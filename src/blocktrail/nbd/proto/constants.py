"""NBD protocol numbers (NetworkBlockDevice/nbd doc/proto.md; QEMU docs/interop/nbd.rst)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_OPTION_LENGTH = 64 * 1024  # no legitimate option comes near this
MAX_NAME_LENGTH = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest WRITE accepted (and advertised as maximum block size)


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class OptionReply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1
    READ_ONLY = 2
    SEND_FLUSH = 4
    SEND_FUA = 8
    ROTATIONAL = 16
    SEND_TRIM = 32
    SEND_WRITE_ZEROES = 64
    SEND_DF = 128
    CAN_MULTI_CONN = 256
    SEND_RESIZE = 512
    SEND_CACHE = 1024
    SEND_FAST_ZERO = 2048


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(IntFlag):
    FUA = 1
    NO_HOLE = 2
    DF = 4
    REQ_ONE = 8
    FAST_ZERO = 16


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


REPLY_FLAG_DONE = 1


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# flags each command may carry (others are a protocol error). FUA on every command: "valid for
# all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
# accept all commands with this bit set (even by ignoring the bit)" (every export sends it).
ALLOWED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.DISC: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}

STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1
BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
