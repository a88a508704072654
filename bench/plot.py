"""Plots a bench.json: speedup of the MoE block over the best transformers variant against T, and the
fraction of the floor reached by ours and by that best variant.

    python -m bench.plot bench/results/<run>/bench.json bench/results/<run>/moe_speedup.png

Needs matplotlib (optional: bench.run calls this only when it is installed).
"""

from __future__ import annotations

import json
import sys


def moe_series(payload: dict):
    title = next(t for t in payload["reports"] if t.startswith("MoE block"))
    rows = payload["reports"][title]
    by_T: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_T.setdefault(int(r["case"].split("=")[1]), {})[r["impl"]] = r
    Ts, speedup, ours_floor, best_floor, best_name = [], [], [], [], []
    for T in sorted(by_T):
        impls = by_T[T]
        ours = impls.get("dots1_ext")
        peers = {k: v for k, v in impls.items() if k.startswith("hf")}
        if not ours or not peers:
            continue
        name, best = min(peers.items(), key=lambda kv: kv[1]["ms"])
        Ts.append(T)
        speedup.append(best["ms"] / ours["ms"])
        ours_floor.append(ours["frac_floor"])
        best_floor.append(best["frac_floor"])
        best_name.append(name)
    return title, Ts, speedup, ours_floor, best_floor, best_name


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(open(json_path).read())
    env = payload["env"]
    title, Ts, speedup, ours_floor, best_floor, best_name = moe_series(payload)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(Ts, speedup, "o-", color="tab:green")
    for T, s in zip(Ts, speedup):
        ax1.annotate(f"{s:.2f}x", (T, s), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("tokens T")
    ax1.set_ylabel("speedup over the fastest transformers variant")
    ax1.set_ylim(0, max(speedup) * 1.3)
    ax1.set_title("MoE block: dots1_ext vs best of HF eager / grouped_mm /\nbatched_mm / grouped_mm + torch.compile",
                  fontsize=9)
    ax2.plot(Ts, ours_floor, "o-", label="dots1_ext", color="tab:green")
    ax2.plot(Ts, best_floor, "s--", label="fastest transformers variant", color="tab:orange")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("tokens T")
    ax2.set_ylabel("floor / time")
    ax2.set_title("fraction of the floor (max of weight bytes / copy BW,\nFLOPs / dense GEMM rate)", fontsize=9)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{title} — {env['device']}, {env['date']}, commit {env['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
