"""`qlora-kit inspect`: what an adapter learned, layer by layer — the LoRA paper's rank study (Hu et al., §7).

Everything about ΔW = s·B·A (B: out×r, A: r×in) comes from an r×r problem: with B = Q_B R_B and Aᵀ = Q_A R_A,
ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ, so the SVD of that r×r core gives ΔW's singular values, and Q_B U, Q_A V its singular
vectors. The out×in matrix is never formed, which keeps a 70B adapter's study to seconds. With the base, W is
read as training saw it — dequant(quant(W)) with the adapter's recorded quantization — to compare ΔW with it:
‖ΔW‖/‖W‖, and how much ΔW amplifies directions W does not emphasise (‖ΔW‖ / ‖UᵀWV‖, the paper's Table 7).
Between two adapters, the normalised subspace similarity φ of their A matrices' top right-singular directions
(the paper's Figure 3), averaged per layer type.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit.adapters import read_adapter_config, read_adapter_weights
from qlora_kit.atomic import AtomicDir
from qlora_kit.errors import CheckpointError
from qlora_kit.quant import QuantConfig
from qlora_kit.tables import pyplot, text_table
from qlora_kit.targets import read_record

ENERGY = (0.9, 0.99)
_EXACT_SVD_MAX = 1 << 20  # elements up to which W's own top-r directions come from a full SVD (1024² is ~0.3 s)
_DEPTH = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")


@dataclass(frozen=True)
class Factors:
    """One adapted layer's LoRA factors, in float64 for the decompositions."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def r(self) -> int:
        return self.a.shape[0]


def read_factors(adapter_dir: Path) -> dict[str, Factors]:
    """module name -> factors and scale, for adapters the kit wrote and ones peft wrote (rsLoRA, alpha_pattern)."""
    lora, raw = read_adapter_config(adapter_dir)
    patterns = raw.get("alpha_pattern") or {}
    out = {}
    for module, ab in sorted(read_adapter_weights(adapter_dir).items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{adapter_dir}: {module} has {', '.join(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"].double(), ab["lora_B"].double()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{adapter_dir}: {module} has factors {list(a.shape)} and {list(b.shape)}, "
                                  "not r×in and out×r (only linear LoRA layers are supported)")
        alpha = next((v for p, v in patterns.items() if module == p or module.endswith("." + p)), lora.alpha)
        r = a.shape[0]
        out[module] = Factors(a, b, float(alpha) / (math.sqrt(r) if lora.use_rslora else r))
    if not out:
        raise CheckpointError(f"{adapter_dir}: the adapter holds no LoRA layers")
    return out


def delta_svd(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U: out×r, σ: r, V: in×r) with s·B·A = U diag(σ) Vᵀ, from QR of B and Aᵀ and the SVD of an r×r core."""
    qb, rb = torch.linalg.qr(f.b)
    qa, ra = torch.linalg.qr(f.a.T)
    u, s, vh = torch.linalg.svd(f.scale * rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def right_singular(a: torch.Tensor) -> torch.Tensor:
    """A's right-singular vectors (in×r), most important first, from the QR of Aᵀ and an r×r SVD."""
    qa, ra = torch.linalg.qr(a.T)
    _, _, vh = torch.linalg.svd(ra.T)
    return qa @ vh.T


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the singular values normalised to sum 1."""
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(sigma: torch.Tensor, fraction: float) -> int:
    """The fewest leading singular directions holding `fraction` of ‖ΔW‖_F² (0 for a zero update)."""
    energy = sigma.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=cumulative.dtype))) + 1


def phi(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """[r1, r2] grid of φ(i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖_F² / min(i, j) for orthonormal columns (LoRA eq. 4)."""
    g = (v1.T @ v2) ** 2
    cumulative = g.cumsum(0).cumsum(1)
    i = torch.arange(1, g.shape[0] + 1, dtype=g.dtype)[:, None]
    j = torch.arange(1, g.shape[1] + 1, dtype=g.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def layer_type(name: str) -> tuple[str, int | None]:
    """`model.layers.3.self_attn.q_proj` -> ("self_attn.q_proj", 3): what layers of one kind share, and depth."""
    m = _DEPTH.match(name)
    return (m[2], int(m[1])) if m else (name, None)


# ------------------------------------------------------------------------------------------------ the study


def _random_orthonormal(rows: int, cols: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q.to(like)


def _top_singular_values(w: torch.Tensor, r: int) -> torch.Tensor:
    """W's r largest singular values: exact for small layers, randomized (Halko et al.) with oversampling above."""
    if w.numel() <= _EXACT_SVD_MAX:
        return torch.linalg.svdvals(w)[:r]
    return torch.svd_lowrank(w, q=min(r + 10, *w.shape), niter=4)[1][:r]


def _versus_base(f: Factors, u, sigma, v, w: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
    """ΔW against W: relative size and the paper's §7.3 projections of W onto r-dimensional subspaces.

    Every product with W costs O(r·out·in), so it runs where W is (the GPU when there is one) in float32."""
    if tuple(w.shape) != (f.b.shape[0], f.a.shape[1]):
        want = [f.b.shape[0], f.a.shape[1]]
        raise CheckpointError(f"base weight has shape {list(w.shape)}, the adapter's ΔW {want}; "
                              "is --base the model the adapter was trained on?")
    r = f.r
    delta_norm, w_norm = float(sigma.norm()), float(w.norm())
    proj = float((u.to(w).T @ w @ v.to(w)).norm())
    top = _top_singular_values(w, r)
    rand_u, rand_v = (_random_orthonormal(n, r, gen, w) for n in w.shape)
    rand = float((rand_u.T @ w @ rand_v).norm())
    return {"w_norm": w_norm, "ratio": delta_norm / w_norm if w_norm else math.inf, "proj_delta": proj,
            "proj_top": float(top.norm()), "proj_random": rand,
            "amplification": delta_norm / proj if proj else math.inf}


def _base_weights(base: Path, adapter_dir: Path, modules: list[str]):
    """Yields (module, W) with W = dequant(quant(W)) in float32, quantized as the adapter's record says, one layer
    at a time on the accelerator when there is one."""
    from qlora_kit.device import resolve_device
    from qlora_kit.loader import load_quantized
    from qlora_kit.lora import QLinear

    record = read_record(adapter_dir)
    model = load_quantized(base, quant=record.quant if record else QuantConfig(), device=resolve_device(),
                           dtype=torch.bfloat16)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    for name in modules:
        if name not in layers:
            raise CheckpointError(f"{adapter_dir}: layer {name!r} is no quantized linear layer of {base} "
                                  "(is --base the model the adapter was trained on?)")
        yield name, layers[name].qweight.dequantize(torch.float32)


def inspect_adapter(adapter_dir: Path, base: Path | None = None, compare: list[Path] = (), seed: int = 0) -> dict:
    """The whole study as a JSON-ready dict (see `render_text` for the table)."""
    factors = read_factors(adapter_dir)
    others = [(path, read_factors(path)) for path in compare]  # a bad --compare fails before any work
    gen = torch.Generator().manual_seed(seed)
    layers, vectors = [], {}
    for name, f in factors.items():
        u, sigma, v = delta_svd(f)
        kind, depth = layer_type(name)
        layers.append({"name": name, "type": kind, "depth": depth, "r": f.r, "scale": f.scale,
                       "delta_norm": float(sigma.norm()), "sigma": sigma.tolist(),
                       "effective_rank": effective_rank(sigma),
                       **{f"rank{round(100 * e)}": energy_rank(sigma, e) for e in ENERGY}})
        vectors[name] = (u, sigma, v)
    if base is not None:
        by_name = {entry["name"]: entry for entry in layers}
        for name, w in _base_weights(base, adapter_dir, list(factors)):
            by_name[name] |= _versus_base(factors[name], *vectors[name], w, gen)
    return {"adapter": str(adapter_dir), "base": str(base) if base else None, "layers": layers,
            "compare": [_compare(factors, path, other) for path, other in others]}


def _compare(mine: dict[str, Factors], path: Path, theirs: dict[str, Factors]) -> dict[str, Any]:
    """φ per layer type, averaged over the layers both adapters adapt, next to the random-subspace baseline."""
    shared = [n for n in mine if n in theirs and mine[n].a.shape[1] == theirs[n].a.shape[1]]
    if not shared:
        raise CheckpointError(f"{path}: adapts no layer (of the same input size) that the inspected adapter does")
    groups: dict[str, list[torch.Tensor]] = {}
    dims: dict[str, int] = {}
    for name in shared:
        kind = layer_type(name)[0]
        grid = phi(right_singular(mine[name].a), right_singular(theirs[name].a))
        if groups.get(kind) and groups[kind][0].shape != grid.shape:
            kind = f"{kind} (r {grid.shape[0]}x{grid.shape[1]})"  # rank_pattern: keep different shapes apart
        groups.setdefault(kind, []).append(grid)
        dims[kind] = mine[name].a.shape[1]
    types = {}
    for kind, grids in groups.items():
        mean = torch.stack(grids).mean(0)
        r1, r2 = mean.shape
        types[kind] = {"layers": len(grids), "phi": mean.tolist(), "phi_1_1": float(mean[0, 0]),
                       "phi_full": float(mean[-1, -1]), "random_full": max(r1, r2) / dims[kind],
                       "in_features": dims[kind]}
    return {"adapter": str(path), "layers": len(shared), "types": types}


# ------------------------------------------------------------------------------------------------- output


def _row(entry: dict[str, Any]) -> list[str]:
    ratio = entry.get("ratio")
    amp = entry.get("amplification")
    return [entry["name"], str(entry["r"]), f"{entry['delta_norm']:.4g}", "-" if ratio is None else f"{ratio:.3g}",
            f"{entry['sigma'][0]:.4g}", f"{entry['effective_rank']:.2f}", str(entry["rank90"]), str(entry["rank99"]),
            "-" if amp is None else f"{amp:.3g}"]


def render_text(report: dict[str, Any]) -> str:
    head = ["layer", "r", "|dW|_F", "|dW|/|W|", "sigma_1", "eff rank", "r90%", "r99%", "amplif."]
    body = [_row(e) for e in report["layers"]]
    parts = [text_table(head, body)]
    for comp in report["compare"]:
        lines = [f"subspace similarity phi vs {comp['adapter']} ({comp['layers']} shared layers; random subspaces "
                 "give max(i,j)/in_features):"]
        for kind, t in comp["types"].items():
            lines.append(f"  {kind}: phi(1,1) {t['phi_1_1']:.3f}, phi(all,all) {t['phi_full']:.3f} "
                         f"(random {t['random_full']:.3f}) over {t['layers']} layers")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_spectra(report: dict[str, Any], path: Path) -> None:
    """Singular values of ΔW per layer type, one line per layer coloured by depth: where the rank goes."""
    plt = pyplot()
    kinds = list(dict.fromkeys(e["type"] for e in report["layers"]))
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), dpi=120, squeeze=False)
    depths = [e["depth"] or 0 for e in report["layers"]]
    cmap, top = plt.get_cmap("viridis"), max(max(depths), 1)
    for ax, kind in zip(axes.flat, kinds):
        for e in (e for e in report["layers"] if e["type"] == kind):
            sigma = np.maximum(np.array(e["sigma"]), 1e-12)
            ax.semilogy(range(1, len(sigma) + 1), sigma, color=cmap((e["depth"] or 0) / top), lw=1, alpha=0.8)
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("singular value index", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("σ of ΔW", fontsize=8)
    fig.suptitle(f"ΔW spectra of {Path(report['adapter']).name} (colour: layer depth, yellow = deepest)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_phi(comp: dict[str, Any], mine: str, path: Path) -> None:
    """φ(i, j) heatmaps per layer type, as in the LoRA paper's Figure 3 (i: inspected adapter, j: the other)."""
    plt = pyplot()
    kinds = list(comp["types"])
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), dpi=120, squeeze=False,
                             layout="constrained")
    for ax, kind in zip(axes.flat, kinds):
        grid = np.array(comp["types"][kind]["phi"])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", origin="upper", aspect="auto",
                       extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel(f"j ({Path(comp['adapter']).name})", fontsize=7)
        ax.set_ylabel(f"i ({mine})", fontsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
    fig.suptitle("normalised subspace similarity of A's top right-singular directions", fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> list[str]:
    """inspect.json, spectra.png and one phi-<k>-<name>.png per comparison, all or nothing."""
    names = ["inspect.json", "spectra.png"]
    with AtomicDir(out, overwrite=True) as tmp:
        (tmp / "inspect.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_spectra(report, tmp / "spectra.png")
        for k, comp in enumerate(report["compare"], 1):
            name = f"phi-{k}-{re.sub(r'[^A-Za-z0-9._-]', '_', Path(comp['adapter']).name)}.png"
            plot_phi(comp, Path(report["adapter"]).name, tmp / name)
            names.append(name)
    return names
