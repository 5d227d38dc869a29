"""What the view answers to ``readlink``: the link text, never a way out of the vfolder.

The kernel follows whatever text ``readlink`` returns, relative to the link's
directory *in the view* — so an absolute target (``/etc/passwd``) or one with
enough ``..`` would walk out of the view onto the host. The view therefore
answers:

- a relative target that stays inside the vfolder: its text, lexically
  normalised (already-normal text, the usual case, comes back unchanged);
  normalising means the kernel walks only down from a real ancestor of the
  link, and every link met on the way is answered by this same rule, so no
  walk can climb above the vfolder root;
- any other target: a dead end that still shows the original text,
  ``../…/.outside-vfolder/<text>``, climbing exactly to the quota scope
  directory, where the view never has an entry of that name.
"""

from __future__ import annotations

OUTSIDE = ".outside-vfolder"


def shown_target(text: str, depth: int) -> str:
    """The target to report for a link whose directory is ``depth`` levels below the vfolder root."""
    if text.startswith("/"):
        return _dead_end(text, depth)
    parts: list[str] = []
    ups = 0
    for comp in text.split("/"):
        if comp in ("", "."):
            continue
        if comp != "..":
            parts.append(comp)
        elif parts:
            parts.pop()
        else:
            ups += 1
    if ups > depth:
        return _dead_end(text, depth)
    return "/".join([".."] * ups + parts) or "."


def _dead_end(text: str, depth: int) -> str:
    return "../" * (depth + 1) + OUTSIDE + ("" if text.startswith("/") else "/") + text
