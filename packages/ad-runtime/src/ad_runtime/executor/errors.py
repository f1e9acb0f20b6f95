"""How an exception is told to a request's caller: one line, no traceback (the log keeps the whole story)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    text = " ".join(str(error).split()) or "(no message)"
    line = f"{type(error).__name__}: {text}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message, stripped (the type's name when it has none)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__
