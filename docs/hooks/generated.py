"""Generated blocks of the docs: key tables and lists of built-ins, written from the code.

The tables are committed into the Markdown, so they read on GitHub and in an editor too. A page
holds a block like::

    <!-- generated: keys corruption:blur -->
    | key | type | default | description |
    ...
    <!-- end generated -->

Blocks:

    keys top | prompt | latents | latents_template | crystal | train | eval | lora | perception | warm_start
         | stage | stage_train
                                  a recipe section's keys (crystalkit.config.schema)
    keys KIND:NAME                a registered component's parameters, e.g. keys corruption:blur
    components KIND               the built-in components of a registry: name and description
    registries                    the registries: kind, entry point group, section, built-ins

Run ``python docs/hooks/generated.py`` to rewrite every block after changing the code, and
``python docs/hooks/generated.py --check`` to list stale ones. As an MkDocs hook, this module fails
``mkdocs build`` on a stale, unknown or malformed block, naming the page and line, so CI catches
docs that drifted from the code. Only built-in components are listed, whatever plugins the
building machine has installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1]

try:
    import crystalkit  # noqa: F401
except ImportError:  # building from a checkout without `pip install -e .`
    sys.path.insert(0, str(DOCS.parent))

from pydantic import BaseModel  # noqa: E402

BLOCK = re.compile(
    r"^<!-- generated: (?P<spec>[^>]*?) -->\n(?P<body>.*?)^<!-- end generated -->$",
    re.MULTILINE | re.DOTALL,
)
LOOSE = re.compile(r"<!--\s*(generated|end generated|keys)\b")
REGENERATE = "python docs/hooks/generated.py"

#: the page documenting each registry's components (where recipes use them: config/keys.py)
PAGES = {
    "backbones": "backbones.md",
    "datasets": "datasets.md",
    "corruptions": "corruptions.md",
    "objectives": "objectives.md",
    "schedules": "schedules.md",
    "loggers": "logging.md",
    "weights": "schedules.md#weight-schedules",
}


def _section_models() -> dict[str, type[BaseModel]]:
    from crystalkit.config.schema import (
        CrystalConfig,
        EvalConfig,
        LatentsConfig,
        LatentTemplate,
        LoraConfig,
        PerceptionConfig,
        PromptConfig,
        Recipe,
        StageSpec,
        StageTrain,
        TrainConfig,
        WarmStartConfig,
    )

    return {
        "top": Recipe,
        "prompt": PromptConfig,
        "latents": LatentsConfig,
        "latents_template": LatentTemplate,
        "crystal": CrystalConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "lora": LoraConfig,
        "perception": PerceptionConfig,
        "warm_start": WarmStartConfig,
        "stage": StageSpec,
        "stage_train": StageTrain,
    }


def _registry(kind: str) -> Any:
    from crystalkit.registries import ALL

    plural = kind if kind in ALL else f"{kind}s"
    if plural not in ALL:
        raise ValueError(f"unknown registry kind {kind!r}; valid kinds: {', '.join(ALL)}")
    return ALL[plural]


def _builtins(registry: Any) -> list[Any]:
    return [entry for entry in registry.entries() if entry.source == "builtin"]


# -- rendering ---------------------------------------------------------------------------------


def _cell(text: str, where: str) -> str:
    """Table-cell text: ``|`` escaped outside code spans (GitHub splits cells on it even inside
    them, so a code span with a pipe is refused)."""
    parts = text.replace("\n", " ").split("`")
    for i, part in enumerate(parts):
        if i % 2 and "|" in part:
            raise ValueError(f"{where}: code span `{part}` contains '|', which splits table cells")
        if not i % 2:
            parts[i] = part.replace("|", "\\|")
    return "`".join(parts).strip()


def _code(text: str) -> str:
    return f"`{text.replace(' | ', ' or ')}`" if text else ""


def keys_table(target: str) -> str:
    """The key table of a recipe section or a registered component."""
    from crystalkit.params import config_model, param_rows

    sections = _section_models()
    component = None
    if target in sections:
        model = sections[target]
    else:
        kind, sep, name = target.partition(":")
        if not sep or not name:
            raise ValueError(
                f"unknown target {target!r}; use one of {', '.join(sections)} or KIND:NAME "
                "(e.g. corruption:blur)"
            )
        registry = _registry(kind)
        names = [entry.name for entry in _builtins(registry)]
        if name not in names:
            raise ValueError(f"no built-in {kind} named {name!r}; built-in: {', '.join(names)}")
        model, component = config_model(registry.get(name)), name
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    if component is not None:
        lines.append(
            f"| `name` | `str` | required | `{component}`, or an import path (see "
            "[how names resolve](registries.md#how-names-resolve)) |"
        )
    for row in param_rows(model):
        kind = row.type + (f" ({row.constraint})" if row.constraint else "")
        description = row.description
        if row.section:  # a nested section: its keys get their own table under this heading
            description = f"{description}; keys: [`{row.key}:`](#{row.key})".lstrip("; ")
        if model.__name__ == "Recipe" and row.key == "name":
            default = "*file stem*"  # load_recipe() names a run after its file
        elif row.default in ("required", "—"):
            default = row.default
        else:
            default = _code(row.default)
        description = _cell(description, f"{target}.{row.key}")
        lines.append(f"| `{row.key}` | {_code(kind)} | {default} | {description} |")
    return "\n".join(lines)


def components_table(kind: str) -> str:
    """The built-in components of one registry, with their descriptions."""
    registry = _registry(kind)
    lines = ["| name | description |", "|---|---|"]
    for entry in _builtins(registry):
        description = _cell(entry.description, f"{registry.kind}:{entry.name}")
        lines.append(f"| `{entry.name}` | {description} |")
    return "\n".join(lines)


def registries_table() -> str:
    """Every registry: its kind, entry point group, where recipes use it and its built-ins."""
    from crystalkit.config.keys import COMPONENT_KEYS
    from crystalkit.registries import ALL

    lines = [
        "| registry (`crystalkit.registries`) | kind | entry point group | used by | built-ins |",
        "|---|---|---|---|---|",
    ]
    for kind, registry in ALL.items():
        keys = [".".join(key.path) for key in COMPONENT_KEYS if key.registry is registry]
        used = ", ".join(f"`{key}`" for key in keys)
        page = PAGES[kind]
        names = ", ".join(f"`{entry.name}`" for entry in _builtins(registry))
        lines.append(
            f"| `{kind.upper()}` | `{kind}` | `{registry.entry_point_group}` | {used} | "
            f"[{names}]({page}) |"
        )
    return "\n".join(lines)


def render(spec: str) -> str:
    """The body of one block (without its markers)."""
    command, _, argument = spec.strip().partition(" ")
    argument = argument.strip()
    if command == "keys" and argument:
        return keys_table(argument)
    if command == "components" and argument:
        return components_table(argument)
    if command == "registries" and not argument:
        return registries_table()
    raise ValueError(
        f"unknown block {spec!r}; use 'keys TARGET', 'components KIND' or 'registries'"
    )


# -- checking and rewriting --------------------------------------------------------------------


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def regenerate(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every block rewritten, and one message per block that was stale. Unknown or
    malformed blocks raise ``ValueError`` naming ``where`` and the line."""
    spans = [m.span() for m in BLOCK.finditer(text)]
    for loose in LOOSE.finditer(text):
        if not any(start <= loose.start() < end for start, end in spans):
            raise ValueError(
                f"{where}:{_line(text, loose.start())}: malformed block; write "
                "'<!-- generated: SPEC -->' and '<!-- end generated -->' on lines of their own"
            )
    stale: list[str] = []

    def replace(match: re.Match[str]) -> str:
        spec = match["spec"]
        try:
            body = render(spec) + "\n"
        except Exception as exc:
            raise ValueError(f"{where}:{_line(text, match.start())}: {exc}") from exc
        if body != match["body"]:
            stale.append(f"{where}:{_line(text, match.start())}: '{spec}' is stale")
        return f"<!-- generated: {spec} -->\n{body}<!-- end generated -->"

    return BLOCK.sub(replace, text), stale


def main(argv: list[str]) -> int:
    """Rewrite the blocks of every page (``--check``: only report stale ones, exit 1 if any)."""
    check = "--check" in argv
    stale_all: list[str] = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new, stale = regenerate(text, str(page.relative_to(DOCS.parent)))
        stale_all += stale
        if stale and not check:
            page.write_text(new, encoding="utf-8")
    for message in stale_all:
        print(message if check else f"rewrote {message.removesuffix(' is stale')}")
    return 1 if check and stale_all else 0


# -- mkdocs event ------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        _, stale = regenerate(markdown, f"docs/{page.file.src_uri}")
    except ValueError as exc:
        raise PluginError(f"generated blocks: {exc}") from exc
    if stale:
        raise PluginError(f"generated blocks: {stale[0]}; run `{REGENERATE}`")
    return markdown


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
