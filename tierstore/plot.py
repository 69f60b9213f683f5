"""`tierstore plot`: one pass of a trace drawn as lanes (disk readers, copy, compute, stalls), and each link's
bytes per second against its bound."""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import InputError
from .trace import COMPUTE, COPY, DISK_PREFIX, DRAFT, PASSES, STALLS

_COLOURS = {"disk": "#e08a1e", "copy": "#2e9e5b", "compute": "#3b6fc4", "stall": "#d1453b", "draft": "#8a5cc2"}
_STALL_COLOURS = {"copy": "#93d3ad", "disk read": "#f2c48d", "host": "#9a9a9a"}  # a stall takes its cause's colour
_BINS = 120


def load_trace(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The complete events of a tierstore trace and its run data; InputError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise InputError(f"trace {path!r} cannot be read: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"trace {path!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list) \
            or (data.get("otherData") or {}).get("tool") != "tierstore":
        raise InputError(f"trace {path!r} is not a tierstore trace (write one with generate --trace FILE)")
    spans = [event for event in data["traceEvents"] if event.get("ph") == "X"]
    return spans, data["otherData"]


def plot_trace(path: str, out_path: str, pass_index: int | None = None) -> str:
    """Draw one pass of the trace at `path` into the PNG `out_path`; returns a one-line summary. By default the
    pass is the middle one of the run (the first, the prefill, only when it is the only one)."""
    spans, meta = load_trace(path)
    passes = sorted((event for event in spans if event["cat"] == PASSES), key=lambda event: event["ts"])
    if not passes:
        raise InputError(f"trace {path!r} holds no pass: the run it traced did not generate")
    if pass_index is None:
        pass_index = len(passes) // 2
    if not 0 <= pass_index < len(passes):
        raise InputError(f"--pass {pass_index}: the trace has passes 0 to {len(passes) - 1}")
    chosen = passes[pass_index]
    start_us, stop_us = chosen["ts"], chosen["ts"] + chosen["dur"]
    lanes = _lanes(spans, start_us, stop_us)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.45 * len(lanes)), sharex=True,
                                         gridspec_kw={"height_ratios": [max(len(lanes), 2), 3]})
    for row, (name, colour, pieces) in enumerate(lanes):
        bars = [((max(e["ts"], start_us) - start_us) / 1e3, (min(e["ts"] + e["dur"], stop_us)
                                                             - max(e["ts"], start_us)) / 1e3) for e in pieces]
        colours = [_STALL_COLOURS.get(e["args"].get("cause"), colour) for e in pieces] if name == "stalls" else colour
        top.broken_barh(bars, (row - 0.4, 0.8), facecolors=colours)
    top.set_yticks(range(len(lanes)), [name for name, _, _ in lanes])
    top.legend(handles=[matplotlib.patches.Patch(color=c, label=f"stall: {cause}")
                        for cause, c in _STALL_COLOURS.items()], loc="upper right", fontsize=7, ncols=3)
    top.invert_yaxis()
    top.set_title(f"pass {pass_index} of {len(passes)}: {chosen['args'].get('tokens', '?')} token(s), "
                  f"{chosen['dur'] / 1e3:.1f} ms; {meta.get('device', '')}, {os.path.basename(str(meta.get('model')))}")
    _draw_rates(bottom, spans, meta, start_us, stop_us)
    bottom.set_xlabel("ms from the start of the pass")
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    busy = sum(min(e["ts"] + e["dur"], stop_us) - max(e["ts"], start_us)
               for name, _, pieces in lanes if name == "compute" for e in pieces)
    return (f"pass {pass_index} of {len(passes)}: {chosen['dur'] / 1e3:.1f} ms, compute busy "
            f"{busy / max(chosen['dur'], 1e-9):.0%}; drawn to {out_path}")


def _lanes(spans: list[dict[str, Any]], start_us: float, stop_us: float) -> list[tuple[str, str, list]]:
    """(lane name, colour, events overlapping the window) from the top: disk readers, copy, compute, stalls."""
    def within(track: str) -> list[dict[str, Any]]:
        return [e for e in spans if e["cat"] == track and e["ts"] < stop_us and e["ts"] + e["dur"] > start_us]

    readers = sorted({e["cat"] for e in spans if e["cat"].startswith(DISK_PREFIX)}, key=lambda n: (len(n), n))
    lanes = [(reader, _COLOURS["disk"], within(reader)) for reader in readers]
    lanes.append(("host->device copy", _COLOURS["copy"], within(COPY)))
    if within(DRAFT):
        lanes.append(("draft", _COLOURS["draft"], within(DRAFT)))
    lanes.append(("compute", _COLOURS["compute"], within(COMPUTE)))
    lanes.append(("stalls", _COLOURS["stall"], within(STALLS)))
    return lanes


def _draw_rates(axes: Any, spans: list[dict[str, Any]], meta: dict[str, Any], start_us: float,
                stop_us: float) -> None:
    """GB/s each link moved, in bins across the window (a transfer's bytes spread evenly over its time), and each
    link's bound from the probe as a dashed line."""
    width_us = (stop_us - start_us) / _BINS
    centres_ms = [(index + 0.5) * width_us / 1e3 for index in range(_BINS)]
    bounds = meta.get("bound_gb_per_s") or {}
    links = (("disk", _COLOURS["disk"], lambda cat: cat.startswith(DISK_PREFIX)),
             ("host->device", _COLOURS["copy"], lambda cat: cat == COPY))
    for name, colour, belongs in links:
        moved = [0.0] * _BINS
        for event in spans:
            if not belongs(event["cat"]) or event["dur"] <= 0:
                continue
            rate = event["args"].get("bytes", 0) / event["dur"]  # bytes per microsecond
            first = max(int((event["ts"] - start_us) // width_us), 0)
            last = min(int((event["ts"] + event["dur"] - start_us) // width_us), _BINS - 1)
            for index in range(first, last + 1):
                low = max(event["ts"], start_us + index * width_us)
                high = min(event["ts"] + event["dur"], start_us + (index + 1) * width_us)
                if high > low:
                    moved[index] += rate * (high - low)
        axes.step(centres_ms, [value / width_us / 1e3 for value in moved], where="mid", color=colour,
                  label=f"{name} GB/s")
        bound = bounds.get(name)
        if bound:
            axes.axhline(bound, color=colour, linestyle="--", linewidth=1, label=f"{name} bound {bound:.1f} GB/s")
    if not any(bounds.get(name) for name, _, _ in links):
        axes.plot([], [], " ", label="bounds unknown: run `tierstore probe`")
    axes.set_ylabel("GB/s")
    axes.legend(loc="upper right", fontsize=8)
