_Entry = tuple[str, int, int, int, int, int, int, int, int]

_Cached = tuple[int, int, int, int, bytes, int]

def scan(path: str, nofollow: bool = False, /) -> tuple[_Entry, list[_Entry]]: ...

def match(prefix: bytes, entries: list[_Entry], cache: dict[bytes, _Cached],
          hits: dict[bytes, _Cached], rows: list[list[object]], file_kind: str, hint_only: int,
          has_content: int, chunked: int, /) -> tuple[list[_Entry], int, int]: ...
