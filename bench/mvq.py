"""Feature compression with multi-codebook vector quantisation (MVQ-KD) on MNIST-1D, 3 seeds, one thread.

A CNN teacher (``CNN1d``, trained with ``supervised`` on the 4000 labelled items; its weights are cached under
``bench/_work/``) and ``MLP(256, 256)`` students trained on the generated, unlabelled transfer set
(``data.mnist1d_transfer``). The teacher feature is its penultimate one (the classifier's input: 25 channels x 5
steps = 125 floats, 500 bytes in float32). Quantizers with ``M`` codebooks of 256 entries (``M`` bytes per vector)
are fitted on the teacher features of 20000 transfer items (residual k-means, then 10 refinement passes).

Every student minimises transfer KD (T = 4) plus one feature term, all else equal (same student, data, batches,
optimiser, schedule, steps and seeds):

* ``kd``            no feature term (reference);
* ``fp32_mse``      (a) hint MSE of a linear projection of the student feature to the full float32 teacher feature;
* ``mvq_mse_M``     (b) the same MSE to the feature decoded from its ``M``-byte MVQ codes;
* ``mvq_ce_M``      (c) cross-entropy of a linear head (student feature -> ``M x 256`` logits) on the codes.

Term weights: the MSE terms are divided by the teacher features' variance (total over dimensions), so they read as
relative errors; the code cross-entropy is weighted ``1 / M`` (mean over codebooks, in nats). Not tuned.

Teacher outputs (logits, features, codes, decoded features) are computed once for every transfer item and looked
up by input during training, as a teacher cache would serve them; the training is the same as with the teacher
running online (``mvq.QuantizedTeacher``), only faster. Reported per run: test accuracy, top-1 agreement with
the teacher, and the relative feature error on the test set, ``sum ||f_hat - f_t||^2 / sum ||f_t - mean||^2``
(``f_t`` the true float32 teacher feature): ``head``, the term's own prediction (the projector's output, or for
``mvq_ce`` the codebook vectors weighted by the head's probabilities); ``probe``, a ridge regression from the
student's feature to the teacher's, fitted on 10000 transfer items (comparable across all methods, ``kd``
included).

    python bench/mvq.py            # full (18 minutes on 2 cores shared with other jobs; M=16 code heads dominate)
    python bench/mvq.py --quick    # the same comparison, smaller (40 s of CPU; 2 min on a busy machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section

from mentor import data, models, recipes, teachers, train
from mentor.eval import evaluate
from mentor.mvq import MultiCodebookQuantizer, with_code_prediction, with_decoded_regression
from mentor.taps import Taps

WORK = Path(__file__).resolve().parent / "_work"
TEMPERATURE, LR_TEACHER, LR_STUDENT, BATCH = 4.0, 1e-2, 2e-3, 256
CODEBOOK_SIZE = 256


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"teacher_epochs": 20, "transfer_size": 10000, "epochs": 10, "hidden": [128, 128], "seeds": [0, 1, 2],
                "codebooks": [4, 16], "error_codebooks": [1, 4, 16], "fit_items": 5000, "fit_iters": 3,
                "probe_items": 2000}
    return {"teacher_epochs": 150, "transfer_size": 50000, "epochs": 15, "hidden": [256, 256], "seeds": [0, 1, 2],
            "codebooks": [4, 8, 16], "error_codebooks": [1, 2, 4, 8, 16], "fit_items": 20000, "fit_iters": 10,
            "probe_items": 10000}


def teacher_features(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's logits ``[N, C]`` and penultimate features (classifier input, ``[N, 125]``)."""
    taps = Taps(teacher, ["classifier"], inputs=True)
    logits, feats = [], []
    with torch.no_grad(), taps:
        for start in range(0, x.shape[0], 4096):
            logits.append(teacher(x[start:start + 4096]))
            feats.append(taps.pop()["classifier"].flatten(1))
    return torch.cat(logits), torch.cat(feats)


class Lookup(nn.Module):
    """Precomputed teacher outputs served by input (exact match of the input row), with the submodules of
    :class:`mentor.mvq.QuantizedTeacher` (``feature``, ``decoded``, ``code_onehot``) for the feature taps."""

    def __init__(self, x: Tensor, logits: Tensor, feature: Tensor, codes: Tensor | None = None,
                 quantizer: MultiCodebookQuantizer | None = None) -> None:
        super().__init__()
        self.index = {row.tobytes(): i for i, row in enumerate(x.numpy())}
        self.logits, self.features, self.codes = logits, feature, codes
        self.decoded_all = quantizer.decode(codes) if codes is not None and quantizer is not None else None
        self.quantizer = quantizer
        self.feature, self.decoded, self.code_onehot = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        idx = torch.tensor([self.index[row.tobytes()] for row in x.numpy()])
        self.feature(self.features[idx])
        out = {"logits": self.logits[idx]}
        if self.codes is not None and self.quantizer is not None and self.decoded_all is not None:
            out["codes"] = self.codes[idx]
            self.decoded(self.decoded_all[idx])
            self.code_onehot(self.quantizer.onehot(out["codes"]))
        return out


def trained_teacher(cfg: dict[str, Any], labelled: data.TensorData) -> nn.Module:
    """The CNN teacher, trained once per setting and cached under bench/_work/."""
    path = WORK / f"mvq_teacher_e{cfg['teacher_epochs']}.safetensors"
    torch.manual_seed(1234)
    teacher = models.CNN1d()
    if path.is_file():
        train.load_model_weights(teacher, path)
    else:
        train.fit(teacher, recipes.supervised(), labelled, epochs=cfg["teacher_epochs"], batch_size=100,
                  optim=train.Optim(lr=LR_TEACHER, schedule="cosine"), seed=1234, progress=False, log_every=10_000)
        train.save_model(teacher, path)
    return teacher.eval()


def relative(pred: Tensor, target: Tensor) -> float:
    return float(((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def probe_error(student: nn.Module, fit_x: Tensor, fit_t: Tensor, test_x: Tensor, test_t: Tensor) -> float:
    """Relative test error of a ridge regression from the student's feature to the teacher's."""
    with torch.no_grad():
        s_fit, s_test = student.features(fit_x).double(), student.features(test_x).double()  # type: ignore[operator]
    mu_s, mu_t = s_fit.mean(0), fit_t.double().mean(0)
    a = s_fit - mu_s
    gram = a.T @ a + 1e-3 * torch.trace(a.T @ a) / a.shape[1] * torch.eye(a.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, a.T @ (fit_t.double() - mu_t))
    return relative((s_test - mu_s) @ w + mu_t, test_t.double())


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparison, smaller (about 1 minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = settings(args.quick)
    started = time.perf_counter()

    labelled, test = data.mnist1d("train"), data.mnist1d("test")
    transfer = data.mnist1d_transfer(cfg["transfer_size"], seed=0)
    teacher = trained_teacher(cfg, labelled)
    teacher_acc = evaluate(teacher, test)["accuracy"]
    t_logits, t_feat = teacher_features(teacher, transfer.x)
    _, test_feat = teacher_features(teacher, test.x)
    dim = t_feat.shape[1]
    variance = float(((t_feat - t_feat.mean(0)) ** 2).sum(1).mean())  # per item, summed over dimensions
    print(json.dumps({"teacher_accuracy": teacher_acc, "feature_dim": dim, "feature_variance": variance}),
          file=sys.stderr)

    # ---- quantizers: bytes and reconstruction error
    quantizers: dict[int, MultiCodebookQuantizer] = {}
    codes: dict[int, Tensor] = {}
    compression: dict[str, Any] = {"fp32": {"bytes_per_vector": 4 * dim, "relative_error_test": 0.0},
                                   "fp16": {"bytes_per_vector": 2 * dim,
                                            "relative_error_test": relative(test_feat.half().float(), test_feat)}}
    for m in sorted(set(cfg["error_codebooks"]) | set(cfg["codebooks"])):
        start = time.perf_counter()
        q = MultiCodebookQuantizer(dim, m, CODEBOOK_SIZE).fit(t_feat[: cfg["fit_items"]], iters=cfg["fit_iters"],
                                                             seed=0)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        c = q.encode(t_feat)
        encode_s = time.perf_counter() - start
        compression[f"mvq_{m}"] = {
            "bytes_per_vector": q.bytes_per_vector, "relative_error_fit": q.history[-1],
            "relative_error_transfer": relative(q.decode(c), t_feat),
            "relative_error_test": q.relative_error(test_feat),
            "fit_seconds": fit_s, "encode_us_per_vector": 1e6 * encode_s / len(t_feat)}
        print(json.dumps({"codebooks": m, **compression[f"mvq_{m}"]}), file=sys.stderr)
        if m in cfg["codebooks"]:
            quantizers[m], codes[m] = q, c
            if not args.quick and m == max(cfg["codebooks"]):
                q.save(WORK / f"mvq_quantizer_M{m}.safetensors")

    # ---- students
    plain = Lookup(transfer.x, t_logits, t_feat)
    lookups = {m: Lookup(transfer.x, t_logits, t_feat, codes[m], quantizers[m]) for m in cfg["codebooks"]}
    base = recipes.transfer_kd(temperature=TEMPERATURE)
    variants: dict[str, tuple[Any, Lookup, MultiCodebookQuantizer | None]] = {
        "kd": (base, plain, None),
        "fp32_mse": (with_decoded_regression(base, "features", teacher="feature", weight=1.0 / variance,
                                             name="fp32_mse"), plain, None)}
    for m in cfg["codebooks"]:
        variants[f"mvq_mse_{m}"] = (with_decoded_regression(base, "features", weight=1.0 / variance,
                                                            name=f"mvq_mse_{m}"), lookups[m], quantizers[m])
    for m in cfg["codebooks"]:
        variants[f"mvq_ce_{m}"] = (with_code_prediction(base, "features", weight=1.0 / m, name=f"mvq_ce_{m}"),
                                   lookups[m], quantizers[m])
    probe_x, probe_t = transfer.x[: cfg["probe_items"]], t_feat[: cfg["probe_items"]]
    eval_teacher = teachers.Frozen(teacher)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in cfg["seeds"]:
        for name, (method, lookup, quantizer) in variants.items():
            torch.manual_seed(seed)
            student = models.MLP(hidden=tuple(cfg["hidden"]))
            start = time.perf_counter()
            result = train.fit(student, method, transfer, teacher=teachers.Frozen(lookup), epochs=cfg["epochs"],
                               batch_size=BATCH, optim=train.Optim(lr=LR_STUDENT, schedule="cosine"), seed=seed,
                               progress=False, log_every=10_000)
            seconds = time.perf_counter() - start
            metrics = evaluate(result.student, test, eval_teacher)
            row: dict[str, Any] = {"seed": seed, "accuracy": metrics["accuracy"], "agreement": metrics["agreement"],
                                   "seconds": seconds, "steps": result.steps,
                                   "probe_rel_error": probe_error(result.student, probe_x, probe_t, test.x, test_feat)}
            if result.projectors is not None:
                with torch.no_grad():
                    head = result.projectors[name](result.student.features(test.x))  # type: ignore[index, operator]
                    coded = name.startswith("mvq_ce") and quantizer is not None
                    pred = quantizer.expected_decode(head) if coded and quantizer is not None else head
                row["head_rel_error"] = relative(pred, test_feat)
            runs[name].append(row)
            print(json.dumps({"method": name, **row}), file=sys.stderr)

    summary: dict[str, dict[str, Any]] = {}
    for name, rows in runs.items():
        summary[name] = {key: summarise([r[key] for r in rows])
                         for key in ("accuracy", "agreement", "probe_rel_error", "head_rel_error", "seconds")
                         if key in rows[0]}
    total_s = time.perf_counter() - started
    result_json = {"benchmark": "mvq", "quick": args.quick, "settings": cfg, "teacher_accuracy": teacher_acc,
                   "feature_dim": dim, "compression": compression, "summary": summary, "runs": runs,
                   "total_seconds": total_s}

    lines = ["| teacher feature as stored | bytes / vector | vs fp32 | relative error (test) | "
             "relative error (transfer) |", "|---|---|---|---|---|"]
    for key, c in compression.items():
        rel_tr = c.get("relative_error_transfer")
        lines.append(f"| {key} | {c['bytes_per_vector']} | {4 * dim / c['bytes_per_vector']:.0f}x | "
                     f"{c['relative_error_test']:.4f} | {'-' if rel_tr is None else f'{rel_tr:.4f}'} |")
    lines += ["", "| student trained with | test accuracy (%) | agreement (%) | feature error, head | "
              "feature error, probe | seconds / run |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        head = f"{s['head_rel_error']['mean']:.3f} ± {s['head_rel_error']['std']:.3f}" if "head_rel_error" in s \
            else "-"
        lines.append(f"| {name} | {100 * s['accuracy']['mean']:.2f} ± {100 * s['accuracy']['std']:.2f} | "
                     f"{100 * s['agreement']['mean']:.2f} ± {100 * s['agreement']['std']:.2f} | {head} | "
                     f"{s['probe_rel_error']['mean']:.3f} ± {s['probe_rel_error']['std']:.3f} | "
                     f"{s['seconds']['mean']:.1f} |")
    body = (f"CNN teacher (test accuracy {100 * teacher_acc:.2f}%, {cfg['teacher_epochs']} epochs) -> "
            f"MLP{tuple(cfg['hidden'])} students on {cfg['transfer_size']} transfer items, {cfg['epochs']} epochs, "
            f"batch {BATCH}, AdamW cosine lr {LR_STUDENT}, seeds {cfg['seeds']}; every student has transfer KD "
            f"(T={TEMPERATURE}) plus the named feature term (see the script's docstring). Teacher feature: the "
            f"{dim}-float penultimate vector. Quantizers: M codebooks x {CODEBOOK_SIZE} entries, fitted on "
            f"{cfg['fit_items']} transfer features ({cfg['fit_iters']} refinement passes). Relative error = "
            "sum ||f_hat - f_t||^2 / sum ||f_t - mean||^2 against the true float32 teacher feature on the test set. "
            f"Total {total_s / 60:.1f} min.\n\n" + "\n".join(lines))
    write_section("mvq" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(result_json))


if __name__ == "__main__":
    main()
