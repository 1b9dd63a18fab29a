from types import MappingProxyType
from typing import Any

MAX_DEPTH: int

def encode(value: dict[str, Any], /) -> bytes: ...
def decode(data: bytes, /) -> MappingProxyType[str, Any]: ...
