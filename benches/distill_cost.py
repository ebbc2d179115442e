"""What a full-size distillation step costs on this machine: teacher encodes (ViT-B, ViT-H) and
one training step of the TinySAM student at the paper's settings (1024 input, 64 prompts, 3
rounds, all three loss terms, backward and Adam step), with random weights of each architecture.

    models/.venv/bin/python benches/distill_cost.py --out benches/distill-cost-results.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from tinysam_export.config import FULL, SAM_VIT_B, SAM_VIT_H  # noqa: E402
from tinysam_export.distill import round_losses, sample_hard_points, valid_cells  # noqa: E402
from tinysam_export.prompting import Decoding, random_point_prompts  # noqa: E402
from tinysam_export.sam import Sam  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 1024, 1024)
    rows = []
    with torch.no_grad():
        for cfg in (SAM_VIT_B, SAM_VIT_H):
            teacher = Sam(cfg).eval()
            start = time.perf_counter()
            embedding = teacher.image_encoder(x)
            rows.append((f"teacher embedding, {cfg.name}", time.perf_counter() - start))
            if cfg is SAM_VIT_B:
                vit_b, vit_b_embedding = teacher, embedding
            del teacher
    student = Sam(FULL).eval()
    optimizer = torch.optim.Adam(student.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    cells = valid_cells((1024, 1024), FULL.low_res_mask_size)
    for i in range(args.steps):
        start = time.perf_counter()
        s_emb = student.image_encoder(x)
        loss = F.mse_loss(s_emb, vit_b_embedding)
        s_dec, t_dec = Decoding(student, s_emb), Decoding(vit_b, vit_b_embedding)
        prompts = random_point_prompts(64, (1024, 1024), gen)
        for r in range(3):
            res = round_losses(s_dec, t_dec, prompts, "logits")
            loss = loss + (res.tokens + res.output) / 3
            if r < 2:
                prompts = prompts.append(*sample_hard_points(res.student_masks, res.teacher_masks, cells, gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows.append((f"student step {i + 1} (64 prompts x 3 rounds, ViT-B teacher)", time.perf_counter() - start))
    lines = [
        "# What a full-size distillation step costs",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Command:",
        "",
        "```sh",
        "models/.venv/bin/python benches/distill_cost.py --out benches/distill-cost-results.md",
        "```",
        "",
        "| what | s |",
        "|---|---:|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in rows),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
