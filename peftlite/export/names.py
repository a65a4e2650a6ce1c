"""Adapter layer paths to checkpoint tensor names, when the two disagree by a prefix.

An adapter saved from ``LlamaForCausalLM`` names ``model.layers.0.self_attn.q_proj``; a checkpoint
saved from ``LlamaModel`` stores ``layers.0.self_attn.q_proj.weight``, and the reverse happens too.
One mapping is chosen for all layers: the paths as they are, or one prefix added or removed; it must
map every layer, and exactly one such mapping may exist (otherwise the error lists them).
"""

from dataclasses import dataclass, field

from ..errors import PeftliteError


@dataclass
class Names:
    add: str = ""
    strip: str = ""
    known: set = field(default_factory=set)
    notes: list = field(default_factory=list)

    def module(self, path: str) -> str:
        return self.add + path.removeprefix(self.strip)

    def tensor(self, path: str, parameter: str) -> str | None:
        """The checkpoint's name of ``<path>.<parameter>``, or None when it has no such tensor."""
        name = f"{self.module(path)}.{parameter}"
        return name if name in self.known and path.startswith(self.strip) else None


def resolve_names(paths: list[str], known: set[str], source: str) -> Names:
    """The one mapping under which every path's ``.weight`` is a tensor of the checkpoint."""
    candidates = [Names(known=known)]
    for path in paths[:1]:
        tail = f"{path}.weight"
        candidates += [Names(add=name[: -len(tail)], known=known) for name in known
                       if name.endswith("." + tail)]
        candidates += [Names(strip=path[: i + 1], known=known) for i, char in enumerate(path)
                       if char == "." and f"{path[i + 1:]}.weight" in known]
    fitting = [c for c in candidates if all(c.tensor(p, "weight") is not None for p in paths)]
    if len(fitting) > 1 and fitting[0].add == fitting[0].strip == "":
        fitting = fitting[:1]  # the paths as they are win
    if len(fitting) > 1:
        options = ", ".join(f"add '{c.add}'" if c.add else f"strip '{c.strip}'" for c in fitting)
        raise PeftliteError(f"{source}: the adapter's layer names fit BASE's tensors in several ways ({options}); "
                            "they are ambiguous.")
    if not fitting:  # the best partial mapping names what is missing
        return max(candidates, key=lambda c: sum(c.tensor(p, "weight") is not None for p in paths))
    chosen = fitting[0]
    if chosen.add or chosen.strip:
        what = f"added '{chosen.add}'" if chosen.add else f"removed '{chosen.strip}'"
        chosen.notes.append(f"adapter layer names {what} to match BASE's tensor names")
    return chosen
