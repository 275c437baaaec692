"""A report as one list of blocks, written twice: report.md (beside its PNGs) and a
self-contained report.html (the same PNGs embedded as base64), so the HTML can be mailed or
attached to an issue alone while the Markdown renders in a repository.

    doc = ReportDoc("Pipeline", out_dir)
    doc.heading("pretrain"); doc.text("...")
    doc.figure(fig, "pretrain_loss")          # writes out_dir/pretrain_loss.png
    doc.table(["stage", "loss"], [["pretrain", 0.31]])
    doc.code("python -m scripts.train ...")
    doc.write()                               # out_dir/report.md, out_dir/report.html
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any, Sequence

from training.plots import save_png


def format_cell(value: Any) -> str:
  """A table cell: floats to 4 significant figures, None as '-'."""
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class ReportDoc:
  """Headings, paragraphs, tables, code and figures, in order (see the module docstring)."""

  def __init__(self, title: str, out_dir: str, *, name: str = "report"):
    self.title, self.out_dir, self.name = title, out_dir, name
    self.blocks: list[tuple[str, Any]] = []
    self.images: list[str] = []
    os.makedirs(out_dir, exist_ok=True)

  def heading(self, text: str, level: int = 2) -> None:
    self.blocks.append(("heading", (level, text)))

  def text(self, text: str) -> None:
    self.blocks.append(("text", text))

  def code(self, text: str) -> None:
    self.blocks.append(("code", text))

  def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    self.blocks.append(("table", ([str(h) for h in headers],
                                  [[format_cell(v) for v in row] for row in rows])))

  def figure(self, fig, stem: str, caption: str = "") -> str:
    """Saves `fig` as `{out_dir}/{stem}.png` (closing it) and adds it; returns the path."""
    path = save_png(fig, os.path.join(self.out_dir, f"{stem}.png"))
    self.images.append(path)
    self.blocks.append(("figure", (os.path.basename(path), caption)))
    return path

  def markdown(self) -> str:
    out = [f"# {self.title}", ""]
    for kind, value in self.blocks:
      if kind == "heading":
        out += [f"{'#' * value[0]} {value[1]}", ""]
      elif kind == "text":
        out += [value, ""]
      elif kind == "code":
        out += ["```", value, "```", ""]
      elif kind == "table":
        headers, rows = value
        out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
      else:
        name, caption = value
        out += [f"![{caption or name}]({name})", ""]
        if caption:
          out += [f"*{caption}*", ""]
    return "\n".join(out)

  def html(self) -> str:
    body = [f"<h1>{html.escape(self.title)}</h1>"]
    for kind, value in self.blocks:
      if kind == "heading":
        body.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
      elif kind == "text":
        body.append(f"<p>{html.escape(value)}</p>")
      elif kind == "code":
        body.append(f"<pre><code>{html.escape(value)}</code></pre>")
      elif kind == "table":
        headers, rows = value
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                        for row in rows)
        body.append(f"<table><tr>{head}</tr>{cells}</table>")
      else:
        name, caption = value
        with open(os.path.join(self.out_dir, name), "rb") as f:
          data = base64.b64encode(f.read()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(name)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>'
                    f"{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
             "pre{background:#f4f4f4;padding:6px;overflow-x:auto}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(self.title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")

  def write(self) -> tuple[str, str]:
    """Writes `{name}.md` and `{name}.html` into `out_dir`; returns their paths."""
    paths = []
    for ext, text in (("md", self.markdown()), ("html", self.html())):
      path = os.path.join(self.out_dir, f"{self.name}.{ext}")
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
      paths.append(path)
    return paths[0], paths[1]
