"""Griffe extension for the documentation site: render the library's reST-flavoured Google docstrings.

The docstrings use Google sections (``Args:``, ``Returns:``) with Sphinx/reST inline markup. Before griffe
parses them, this extension rewrites, in every docstring of the package:

* roles such as :func:`~lightning_balance.functional.ogm_ratios`, :class:`GradientBalancingCallback` or
  :meth:`title <target>` into inline code, linked to the API page when the target is documented
  (an optional cross-reference: an unknown target stays plain code, never a build warning);
* :math:`...` into inline math, ``.. math::`` directives into display math (pymdownx.arithmatex, MathJax);
* ``.. warning::`` / ``.. note::`` directives into admonitions;
* a paragraph ending in ``::`` (reST's literal-block marker) into one ending in ``:`` (the indented block
  after it is a Markdown code block already);

and gives attributes without a docstring the text of their Sphinx ``#:`` comments.

It changes nothing in the package: only what mkdocstrings renders. Used from ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``); excluded from the built site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>func|meth|class|mod|data|attr|obj|exc|const):`(?P<body>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. (?P<name>math|warning|note|tip|important|caution|danger|seealso)::"
                        r"[ \t]*(?P<rest>.*)$")
_LITERAL_MARKER = re.compile(r"(?P<text>\S.*?)(?P<space>\s?)::\s*$")
_ADMONITION = {"seealso": "info"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _directive_block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The body lines of a directive starting at ``start`` (indented deeper than ``indent``, blank lines
    inside kept), dedented, and the index after it."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    body = lines[start:end]
    width = min((_indent(x) for x in body if x.strip()), default=0)
    return [x[width:] for x in body], end


def _rewrite_directives(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        pad, name, rest = match["indent"], match["name"], match["rest"].strip()
        body, i = _directive_block(lines, i + 1, len(pad))
        if rest:
            body = [rest, *body]
        while body and not body[0].strip():
            body.pop(0)
        if out and out[-1].strip():
            out.append("")
        if name == "math":
            out += [pad + "\\[", *(pad + x if x.strip() else "" for x in body), pad + "\\]"]
        else:
            out.append(f"{pad}!!! {_ADMONITION.get(name, name)}")
            out += [pad + "    " + x if x.strip() else "" for x in body]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def _rewrite_literal_markers(text: str) -> str:
    def fix(line: str) -> str:
        stripped = line.lstrip()
        match = _LITERAL_MARKER.fullmatch(stripped)
        if match is None or stripped.startswith(("!!!", "\\[")):
            return line
        lead = line[: len(line) - len(stripped)]
        body = match["text"]
        # "Example::" -> "Example:"; "some text ::" -> "some text" (reST's expanded and partial forms)
        return lead + (body if match["space"] else body + ":")

    return "\n".join(fix(line) for line in text.split("\n"))


class RstDocstrings(griffe.Extension):
    """Rewrite reST markup in the package's docstrings to Markdown before griffe parses them."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._collection = loader.modules_collection
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if obj.is_attribute and obj.docstring is None:
            self._comment_docstring(obj)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)

    def _comment_docstring(self, obj: griffe.Object) -> None:
        """The ``#:`` comment lines right above an attribute's assignment, as its docstring."""
        if obj.lineno is None:
            return
        try:
            source = obj.module.lines
        except Exception:  # noqa: BLE001 - no source (a compiled module): no comment docstring
            return
        comments: list[str] = []
        number = obj.lineno - 2  # the line above, 0-based
        while number >= 0 and source[number].lstrip().startswith("#:"):
            comments.insert(0, source[number].lstrip()[2:].strip())
            number -= 1
        if comments:
            obj.docstring = griffe.Docstring("\n".join(comments), lineno=number + 2, parent=obj)

    def _target(self, name: str, obj: griffe.Object) -> str | None:
        """The canonical path of a role's target, resolved from ``obj``'s scope; ``None`` if unknown."""
        name = name.lstrip(".")
        try:
            if not name.startswith("lightning_balance"):
                head, _, tail = name.partition(".")
                scope = obj if obj.is_class or obj.is_module else obj.parent
                name = scope.resolve(head) + (f".{tail}" if tail else "")  # type: ignore[union-attr]
            return self._collection[name].canonical_path
        except Exception:  # noqa: BLE001 - an unresolvable name is rendered as plain code
            return None

    def _rewrite(self, text: str, obj: griffe.Object) -> str:
        def role(match: re.Match[str]) -> str:
            body = match["body"].strip()
            explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
            if explicit:
                title, target = explicit["title"], explicit["target"]
            else:
                target = body.lstrip("~")
                title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
            if match["role"] in ("func", "meth") and not title.endswith(")"):
                title += "()"
            path = self._target(target.lstrip("~"), obj)
            code = f"`{title}`"
            return f'<autoref identifier="{path}" optional>{code}</autoref>' if path else code

        text = _rewrite_directives(text)
        text = _MATH_ROLE.sub(lambda m: f"\\({m['body']}\\)", text)
        text = _ROLE.sub(role, text)
        return _rewrite_literal_markers(text)
