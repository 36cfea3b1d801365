"""A small Markdown renderer for sweep reports: headings, paragraphs, lists, block quotes, fenced code,
pipe tables, emphasis, inline code, links and images. Safe by construction: the text is HTML-escaped
before any markup is added, raw HTML never passes through, links must be http(s), and an image is shown
only when `image_url(src)` maps its source to a URL (else its alt text is shown)."""
from __future__ import annotations

import html
import re
from typing import Callable

_CODE = re.compile(r"`([^`]+)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EM = re.compile(r"(?<![\*\w])\*(?=\S)(.+?)(?<=\S)\*(?![\*\w])")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _inline(text: str, image_url: Callable[[str], str | None]) -> str:
    """Escape, then add markup; inline code is protected from the other rules."""
    out = html.escape(text, quote=True)
    codes: list[str] = []

    def keep_code(m):
        codes.append(f"<code>{m.group(1)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    out = _CODE.sub(keep_code, out)

    def image(m):
        alt, src = m.group(1), html.unescape(m.group(2))
        url = image_url(src)
        if url is None:
            return f"[{alt}]"
        return f'<img src="{html.escape(url, quote=True)}" alt="{alt}">'

    def link(m):
        label, href = m.group(1), html.unescape(m.group(2))
        if re.match(r"^https?://", href):
            return f'<a href="{html.escape(href, quote=True)}" rel="noopener noreferrer">{label}</a>'
        url = image_url(href)
        return f'<a href="{html.escape(url, quote=True)}">{label}</a>' if url else label

    out = _IMAGE.sub(image, out)
    out = _LINK.sub(link, out)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    out = _EM.sub(r"<em>\1</em>", out)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], out)


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip() for c in s.split("|")]


def render(text: str, image_url: Callable[[str], str | None] = lambda src: None) -> str:
    """Markdown text -> HTML (a string safe to insert into a page)."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    i, n = 0, len(lines)
    inl = lambda s: _inline(s, image_url)  # noqa: E731
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.lstrip().startswith("```"):
            j = i + 1
            while j < n and not lines[j].lstrip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif m := _HEADING.match(line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inl(m.group(2))}</h{level}>")
            i += 1
        elif "|" in line and i + 1 < n and _TABLE_SEP.match(lines[i + 1]):
            head = _cells(line)
            rows = []
            i += 2
            while i < n and "|" in lines[i] and lines[i].strip():
                rows.append(_cells(lines[i]))
                i += 1
            th = "".join(f"<th>{inl(c)}</th>" for c in head)
            body = "".join("<tr>" + "".join(f"<td>{inl(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>')
        elif line.lstrip().startswith(">"):
            quoted = []
            while i < n and lines[i].lstrip().startswith(">"):
                quoted.append(lines[i].lstrip()[1:].removeprefix(" "))
                i += 1
            out.append(f"<blockquote>{render(chr(10).join(quoted), image_url)}</blockquote>")
        elif _LIST.match(line):
            ordered = bool(re.match(r"^\s*\d", line))
            items = []
            while i < n and (m := _LIST.match(lines[i])):
                item = [m.group(1)]
                i += 1
                while i < n and lines[i].startswith("  ") and lines[i].strip() and not _LIST.match(lines[i]):
                    item.append(lines[i].strip())
                    i += 1
                items.append(f"<li>{inl(' '.join(item))}</li>")
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>{''.join(items)}</{tag}>")
        else:
            para = []
            while i < n and lines[i].strip() and not (_HEADING.match(lines[i]) or lines[i].lstrip().startswith(
                    ("```", ">")) or _LIST.match(lines[i])
                    or ("|" in lines[i] and i + 1 < n and _TABLE_SEP.match(lines[i + 1]))):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inl(' '.join(para))}</p>")
    return "\n".join(out)
