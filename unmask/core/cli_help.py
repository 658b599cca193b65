"""``python <entry>.py --help``: the groups and keys that entry point reads, one line each.

The text is generated from the entry's config (``configs/<entry>.yaml``): its top-level keys,
the groups of its defaults list with their options (the default marked ``*``), and each
group's keys as its default option sets them. Every description is the YAML comment beside
(or just above) the entry, so the help says what the files say and cannot drift from them.

Hydra prints ``hydra.help.template``; ``configs/hydra/help/<entry>.yaml`` sets it to
``${unmask_help:<entry>}``, this module's resolver (registered with the config schemas, before
Hydra composes). Hydra's own flags stay behind ``--hydra-help``.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RESOLVER = "unmask_help"
KEY_WIDTH = 26  # the description column
MAX_GROUP_KEYS = 24  # a group's keys shown before "... (N more)"
HIDDEN_KEYS = {"task_name"}  # set by the entry config for its run folder, not by a user

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*)\s*:\s*(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_ITEM = re.compile(r"^(?P<indent>\s*)-\s+(?P<key>[A-Za-z_][\w]*)\s*:\s*(?P<value>[^#]*?)\s*(?:#.*)?$")
_DEFAULT = re.compile(r"^\s*-\s*(?P<group>[\w/@]+)\s*:\s*(?P<option>[\w.\-]+|null)\s*(?:#\s?(?P<comment>.*))?$")


@dataclass
class Entry:
    key: str
    value: str
    comment: str


def _comment_block(lines: list[str], i: int) -> str:
    """The first line of the comment block right above line ``i`` (at the same indentation)."""
    block = []
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("#"):
        block.insert(0, lines[j].strip().lstrip("#").strip())
        j -= 1
    return block[0] if block else ""


def yaml_entries(path: Path) -> list[Entry]:
    """Every key of a YAML config file outside its defaults list, dotted by nesting, with its
    value as written and its comment (beside it, else the first line of the block above it).
    ``_target_``-like keys, list items and the ``hydra`` node are left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    skipping = None  # indent of a skipped node (defaults, hydra, a list item's mapping)
    lists: dict[str, Entry] = {}  # a list of mappings (augment.transforms): one entry naming its items
    for i, line in enumerate(lines):
        if not line.strip() or line.strip().startswith("#"):
            continue
        if line.strip().startswith("-"):
            item = _ITEM.match(line)
            if item and stack and (skipping is None or len(item["indent"].expandtabs()) <= skipping):
                skipping = len(item["indent"].expandtabs())  # the item's own keys are not the group's
                parent = ".".join(k for _, k in stack)
                if parent not in lists:
                    lists[parent] = Entry(parent, "", _comment_block(lines, i))
                    out.append(lists[parent])
                name = item["value"].rsplit(".", 1)[-1] if item["key"] == "_target_" else f"{item['key']}: {item['value']}"
                lists[parent].value = f"{lists[parent].value[:-1]}, {name}]" if lists[parent].value else f"[{name}]"
            continue
        match = _KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"].expandtabs())
        if skipping is not None:
            if indent > skipping:
                continue
            skipping = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"]
        if not stack and key in ("defaults", "hydra"):
            skipping = indent
            continue
        dotted = ".".join([k for _, k in stack] + [key])
        comment = (match["comment"] or "").strip() or _comment_block(lines, i)
        value = match["value"]
        if value in ("", "|", ">"):  # a mapping (or a block): its children follow
            stack.append((indent, key))
            if comment:
                out.append(Entry(dotted, "", comment))
            continue
        if key.startswith("_") and key.endswith("_"):
            continue
        out.append(Entry(dotted, value, comment))
    return out


def _defaults_lines(path: Path) -> list[str]:
    """The lines of a config file's top-level ``defaults:`` list."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^defaults\s*:", line):
            inside = True
        elif inside and line and not line.startswith((" ", "-", "#")):
            break
        elif inside:
            lines.append(line)
    return lines


def defaults_groups(path: Path) -> list[tuple[str, str, str]]:
    """(group, default option, comment) of a config's defaults list; ``hydra`` and ``override``
    entries are left out."""
    groups = []
    for line in _defaults_lines(path):
        match = _DEFAULT.match(line)
        if match and "/" not in match["group"] and match["group"] != "hydra":
            groups.append((match["group"], match["option"], (match["comment"] or "").strip()))
    return groups


def is_global(path: Path) -> bool:
    """An option file in ``# @package _global_`` (a recipe: experiment, hparams_search): its keys
    are the whole config's, not its group's."""
    return any(line.strip().replace(" ", "") == "#@package_global_" for line in path.read_text(encoding="utf-8").splitlines()[:3])


def option_keys(path: Path, seen: frozenset = frozenset()) -> list[Entry]:
    """The keys an option file sets, those of the options of its own group that it extends
    first (``trainer/cpu.yaml``: ``defaults: [default]``); a later file's key replaces an earlier's."""
    merged: dict[str, Entry] = {}
    for base in defaults_list(path):
        base_file = path.parent / f"{base}.yaml"
        if "/" not in base and ":" not in base and base_file.is_file() and base_file not in seen:
            merged.update((e.key, e) for e in option_keys(base_file, seen | {path}))
    for e in yaml_entries(path):
        old = merged.get(e.key)
        merged[e.key] = Entry(e.key, e.value, e.comment or (old.comment if old else ""))
    return list(merged.values())


def defaults_list(path: Path) -> list[str]:
    """The plain entries (``- NAME``) of a file's defaults list."""
    out = []
    for line in _defaults_lines(path):
        match = re.match(r"^\s*-\s*(?P<name>[\w.\-]+)\s*(?:#.*)?$", line)
        if match and match["name"] != "_self_":
            out.append(match["name"])
    return out


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#"):
            text = line.strip().lstrip("#").strip()
            if text and not text.startswith(("python ", "...", "@package")):
                return text
        elif line.strip():
            break
    return ""


def _purpose(entry: str) -> str:
    """The first line of the entry script's docstring."""
    script = ROOT / f"{entry}.py"
    if not script.is_file():
        return ""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0].replace("``", "`") if doc.strip() else ""


def _line(name: str, text: str, indent: int = 2) -> str:
    name = " " * indent + name
    if not text:
        return name
    pad = max(KEY_WIDTH - len(name), 1)
    return f"{name}{' ' * pad}  {text}" if len(name) < KEY_WIDTH else f"{name}  {text}"


def _collapse(group: str, keys: list[Entry]) -> list[tuple[str, str]]:
    """(name, description) lines of a group's keys: wiring (a bare interpolation such as
    ``data.canonical=${canonical}``) left out; keys nested deeper than one sub-node folded
    into one line per sub-node (``perturb.families.*: box_blur, jpeg, ...``)."""
    out: list[tuple[str, str]] = []
    folded: dict[str, list[str]] = {}
    for item in keys:
        parts = item.key.split(".")
        if len(parts) > 2:
            if parts[0] not in folded:
                folded[parts[0]] = []
                out.append((f"{group}.{parts[0]}.*", ""))  # its sub-nodes are listed below
            if parts[1] not in folded[parts[0]]:
                folded[parts[0]].append(parts[1])
            continue
        if re.fullmatch(r"\$\{[^}]*\}", item.value) and not item.comment:
            continue
        out.append((f"{group}.{item.key}={item.value}", item.comment))
    return [(n, ", ".join(folded[n.split(".")[1]]) if n.endswith(".*") else t) for n, t in out]


def render(entry: str) -> str:
    """The help text of ``python <entry>.py --help`` (plain text)."""
    config = CONFIGS / f"{entry}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no entry config {config}")
    lines = [f"{entry}.py: {_purpose(entry)}" if _purpose(entry) else f"{entry}.py"]
    usage = next((ln.strip().lstrip("#").strip() for ln in config.read_text(encoding="utf-8").splitlines() if ln.startswith("# python ")), "")
    lines += ["", f"Usage: {usage or f'python {entry}.py [KEY=VALUE ...] [GROUP=OPTION ...] [GROUP.KEY=VALUE ...]'}", "", "Keys:"]
    for item in yaml_entries(config):
        if item.value and item.key not in HIDDEN_KEYS:
            lines.append(_line(f"{item.key}={item.value}", item.comment))
    lines += ["", "Groups (GROUP=OPTION picks an option, * the default; GROUP.KEY=VALUE sets one key):"]
    for group, default, comment in defaults_groups(config):
        folder = CONFIGS / group
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        shown = " | ".join(f"{n}*" if n == default else n for n in names)
        default_file = folder / f"{default}.yaml"
        describe = comment or (_first_comment(default_file) if default_file.is_file() else "")
        lines += ["", _line(group, f"{shown}"), f"      {describe}" if describe else ""]
        recipes = [n for n in names if is_global(folder / f"{n}.yaml")]
        if recipes:  # recipes set keys all over the config: one line per option instead
            lines += [_line(f"{group}={n}", _first_comment(folder / f"{n}.yaml"), indent=6) for n in recipes]
            continue
        # the keys, as the default option sets them (or the first option that sets any)
        for candidate in [default_file] + [folder / f"{n}.yaml" for n in names]:
            keys = [e for e in option_keys(candidate) if e.value] if candidate.is_file() else []
            if keys:
                break
        if keys and candidate != default_file:
            lines.append(f"      keys of {group}={candidate.stem}:")
        shown_keys = [(n, "" if t == describe else t) for n, t in _collapse(group, keys)]  # no echo of the group's line
        for name, text in shown_keys[:MAX_GROUP_KEYS]:
            lines.append(_line(name, text, indent=6))
        if len(shown_keys) > MAX_GROUP_KEYS:
            lines.append(f"      ... ({len(shown_keys) - MAX_GROUP_KEYS} more in configs/{group}/{candidate.stem}.yaml)")
    lines += [
        "",
        f"The composed config: python {entry}.py --cfg job [overrides]. Hydra's own flags: python {entry}.py --hydra-help.",
    ]
    return "\n".join(line for line in lines if line is not None).replace("\n\n\n", "\n\n")


def _template(entry: str) -> str:
    """``render`` for Hydra's help template: ``string.Template`` reads ``$`` as a placeholder."""
    return render(str(entry)).replace("$", "$$")


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _template)
