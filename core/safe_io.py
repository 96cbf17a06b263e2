"""Reading files that someone else may have made (a run directory, a model folder, a config): only
regular files, never more than a bound, and YAML without alias bombs.

A FIFO blocks the reader forever, /dev/zero never ends, a 10 GB "config.json" fills the memory of
whoever reads it: every read here opens without blocking, checks what the path is, and stops at a
size. The errors are FileProblem (a ValueError) with a sentence naming the file.
"""

from __future__ import annotations

import json
import os
import stat

import yaml

MAX_JSON_BYTES = 16 * 2**20  # run.json, config.json, tokenizer_config.json, ...
MAX_YAML_BYTES = 4 * 2**20  # config.yaml (a long custom template included)
MAX_YAML_VALUES = 100_000  # values after expanding aliases (a config has a few hundred)


class FileProblem(ValueError):
    """A path that is not a readable regular file of a sane size, or not valid JSON/YAML."""


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """stat() of a regular file (symlinks followed), else FileProblem saying what the path is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{path}: file not found") from None
    except OSError as e:
        raise FileProblem(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{path} is {kind_of(st.st_mode)}, not a regular {what}")
    return st


def read_bytes(path: str | os.PathLike, max_bytes: int | None, what: str = "file") -> bytes:
    """The whole file, if it is a regular file (of at most max_bytes; None: any size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FileProblem(f"{path}: file not found") from None
    except OSError as e:
        raise FileProblem(f"{path}: cannot read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"{path} is {kind_of(st.st_mode)}, not a regular {what}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileProblem(f"{path} is {st.st_size / 2**20:.1f} MiB; a {what} here may be at most "
                              f"{max_bytes / 2**20:.0f} MiB")
        data = f.read()  # a regular file: read to its end (preallocated from its size)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise FileProblem(f"{path}: more than {max_bytes / 2**20:.0f} MiB")
    return data


def read_text(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, what: str = "file") -> str:
    return read_bytes(path, max_bytes, what).decode("utf-8", "replace")


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file"):
    text = read_text(path, max_bytes, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FileProblem(f"{path}: not valid JSON ({str(e)[:200]})") from None


def tail_bytes(path: str | os.PathLike, n: int) -> bytes:
    """The last n bytes of a regular file (b"" when it is missing or not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return b""
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read(n)


# ---------------------------------------------------------------- YAML

def _expanded_values(node, limit: int) -> int:
    """Values the node stands for once aliases are expanded (`*a` repeats a's whole subtree):
    each distinct node is sized once, so a billion-laughs file costs linear time to refuse."""
    sizes: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        n, done = stack.pop()
        if id(n) in sizes:
            continue
        children = []
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [x for pair in n.value for x in pair]
        if done or not children:
            sizes[id(n)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
        else:
            stack.append((n, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(node)]


def load_yaml(text: str, source: str = "YAML", max_values: int = MAX_YAML_VALUES):
    """yaml.safe_load, refusing a document that expands to more than max_values values (an alias
    bomb) or nests too deeply. Raises FileProblem naming the source."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:  # the reader refuses some characters up front
        raise FileProblem(f"{source}: not valid YAML: {e}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, max_values) > max_values:
            raise FileProblem(f"{source}: expands to more than {max_values:,} values (aliases repeating "
                              "aliases?); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise FileProblem(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise FileProblem(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike, max_bytes: int = MAX_YAML_BYTES):
    return load_yaml(read_text(path, max_bytes, "YAML file"), str(path))


def is_regular(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
