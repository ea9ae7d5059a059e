"""`skipserve calibrate`: record per-layer cos(pre-FFN, post-FFN) on built-in text, suggest
preset values, and write calibration.json plus a plot (calibration.png) people can read."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from engine.skip.calibration import RecordingGate, suggest

TEXTS = Path(__file__).parent / "data" / "calibration.txt"


def record_cosines(engine, texts: list[str]) -> torch.Tensor:
    """Dense forward over each text; -> cos(h, h + FFN(h)) as [layers, tokens]."""
    runner = engine.runner
    chunks = []
    for text in texts:
        ids = engine.tokenizer.encode(text)[: engine.max_model_len]
        gate = RecordingGate(runner.num_layers)
        with engine.kv_blocks([len(ids)]) as (table,):
            runner.prefill([(ids, table, 0)], gate)
        chunks.append(gate.matrix().cpu())
    return torch.cat(chunks, dim=1)


def plot(summary: dict, cosines: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["suggested"]
    layers = cosines.shape[0]
    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=110)
    for lo, hi in [(-0.5, s["cold_start"] - 0.5), (layers - s["cold_end"] - 0.5, layers - 0.5)]:
        ax.axvspan(lo, hi, color="#dddddd", zorder=0)
    ax.boxplot([cosines[i].numpy() for i in range(layers)], positions=range(layers), widths=0.6,
               showfliers=False, patch_artist=True, boxprops={"facecolor": "#9ecae1"})
    ax.axhline(s["threshold"], color="#d62728", linestyle="--", label=f"suggested threshold {s['threshold']:.3f}")
    ax.set_xlabel("layer (grey: cold layers, FFN always runs)")
    ax.set_ylabel("cos(residual before FFN, after FFN)")
    ax.set_xticks(range(layers))
    # zoom on the skippable range; layers far below it (typically the first and last) are labelled
    hot = cosines[s["cold_start"]: layers - s["cold_end"]]
    low = min(float(hot.quantile(0.02)), s["threshold"]) - 0.01
    ax.set_ylim(low, 1.001)
    for i in range(layers):
        med = float(cosines[i].median())
        if med < low:
            ax.annotate(f"median\n{med:.2f}\n(off scale)", (i, low), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
    share = ax.twinx()
    share.plot(range(layers), [l["share_above_threshold"] for l in summary["layers"]], color="#ff7f0e",
               marker="o", label="share of tokens above threshold")
    share.set_ylim(0, 1.05)
    share.set_ylabel("share above threshold")
    lines = ax.get_legend_handles_labels()
    lines2 = share.get_legend_handles_labels()
    fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.94))
    fig.suptitle(f"{title}: how much each FFN changes the residual ({summary['tokens']} tokens); "
                 "higher = more skippable")
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    p = argparse.ArgumentParser(prog="skipserve calibrate", description=__doc__)
    p.add_argument("--model", default="", help="preset name, .gguf file or HF folder (default: embedded)")
    p.add_argument("--out", required=True, help="output directory for calibration.json and calibration.png")
    p.add_argument("--texts", default=str(TEXTS), help="text file, one passage per line")
    p.add_argument("--trigger-rate", type=float, default=0.6,
                   help="share of tokens whose skip trigger should fire at the suggested threshold")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO")
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, max_num_seqs=1, max_model_len=1024))
    texts = [t for t in Path(args.texts).read_text().splitlines() if t.strip()]
    cosines = record_cosines(engine, texts)
    result = suggest(cosines, target_trigger_rate=args.trigger_rate)
    summary = result.summary()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))
    wrote = [out / "calibration.json"]
    try:
        plot(summary, cosines, out / "calibration.png", args.model or "smollm2-135m-instruct")
        wrote.append(out / "calibration.png")
    except ImportError:  # matplotlib is an extra: skipserve[plots]
        print("no calibration.png: matplotlib is not installed (pip install 'skipserve[plots]')")
    s = summary["suggested"]
    print(f"{summary['tokens']} tokens, {cosines.shape[0]} layers")
    print("suggested preset values (server/presets/*.yaml, skip:):")
    print(f"  cold_start: {s['cold_start']}\n  cold_end: {s['cold_end']}\n  threshold: {s['threshold']}")
    print("wrote " + " and ".join(map(str, wrote)))


if __name__ == "__main__":
    main()
