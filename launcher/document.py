"""A report as a list of blocks, rendered twice: Markdown with PNG files beside it, and one
self-contained HTML file with the same pictures embedded."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from sparsity_scaling.files import write_bytes_atomic, write_text_atomic


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows]))

    def image(self, name: str, png: bytes, caption: str) -> None:
        self.blocks.append(("image", name, png, caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self, image_dir: str) -> str:
        out = [f"# {self.title}"]
        for kind, *body in self.blocks:
            if kind == "heading":
                out.append(f"## {body[0]}")
            elif kind == "paragraph":
                out.append(body[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in body[0]))
            elif kind == "table":
                headers, rows = body
                lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "image":
                name, _, caption = body
                out.append(f"![{caption}]({image_dir}/{name})\n\n*{caption}*")
            elif kind == "code":
                out.append(f"```\n{body[0]}\n```")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        parts = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, *body in self.blocks:
            if kind == "heading":
                parts.append(f"<h2>{_inline(body[0])}</h2>")
            elif kind == "paragraph":
                parts.append(f"<p>{_inline(body[0])}</p>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body[0]) + "</ul>")
            elif kind == "table":
                headers, rows = body
                head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
                cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image":
                name, png, caption = body
                data = base64.b64encode(png).decode()
                parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{_inline(caption)}</figcaption></figure>")
            elif kind == "code":
                parts.append(f"<pre><code>{html.escape(body[0])}</code></pre>")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")

    def write(self, directory: Path, stem: str = "report") -> None:
        """stem.md with stem_files/*.png, and stem.html, each written atomically."""
        image_dir = f"{stem}_files"
        for kind, *body in self.blocks:
            if kind == "image":
                write_bytes_atomic(directory / image_dir / body[0], body[1])
        write_text_atomic(directory / f"{stem}.md", self.markdown(image_dir))
        write_text_atomic(directory / f"{stem}.html", self.html())


def _inline(text: str) -> str:
    """Escape, then render Markdown's `code` and **bold** the way the .md shows them."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
    "pre{background:#f6f6f6;padding:.8em;overflow-x:auto}code{background:#f6f6f6}"
)
