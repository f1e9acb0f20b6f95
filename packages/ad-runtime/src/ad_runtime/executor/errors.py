"""How an exception is told to a request's caller: one line, no traceback (the log keeps the whole story)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    text = " ".join(str(error).split()) or "(no message)"
    line = f"{type(error).__name__}: {text}"
    return line if len(line) <= limit else line[: limit - 3] + "..."
