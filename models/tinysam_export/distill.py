"""Full-stage distillation (TinySAM §3.2): train a TinySAM student from a SAM-family teacher.

One training step is one image:

1. The student encodes the image; the teacher's embedding comes from `TeacherCache` (the teacher's
   encoder runs once per image, ever).
2. `prompts_per_image` point prompts are drawn uniformly over the image; the teacher answers them,
   and a share of them become box prompts around the teacher's best mask.
3. For `rounds` rounds both decoders answer the same prompts and the losses are taken; between
   rounds each prompt gains a *hard* point where the student's mask disagrees with the teacher's
   (`sample_hard_points`: a missed pixel becomes a positive point, a spurious one a negative point).
4. Loss = embedding distance + the rounds' mean of (output-token distance + output loss), each
   term weighted (0 switches it off). All distances are mean squared errors; the output loss is the
   distance of the three mask-logit maps (or, with `mask_loss="focal-dice"`, SAM's focal + dice
   loss of the student's closest mask against the teacher's best one) plus the distance of the IoU
   predictions.

Measured on the reduced test models (`models/tests/test_distill.py`), the logit distance raises the
student's agreement with the teacher where focal + dice against the binarised teacher mask lowers
it on so little data: it carries the teacher's confidence everywhere, not just a 0/1 target.

Everything a run needs to continue is in `OUT/state.pt` (rerunning the command resumes); the student
is saved as `OUT/student.pth` in TinySAM's key layout after every epoch, so `export --checkpoint`
takes it as it is. `OUT/log.jsonl` records losses and the held-out student-vs-teacher mask IoU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import CONFIGS, TEACHER_CONFIGS, ModelConfig
from .images import ImageError, read_rgb
from .preprocess import preprocess, resized_size
from .prompting import Decoding, Prompts, random_point_prompts
from .sam import Sam
from .weights import file_sha256, load_checkpoint, synthetic_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
FOCAL_WEIGHT = 20.0
"""SAM's ratio of focal to dice loss in its mask loss."""


class DistillError(Exception):
    """A distillation request that cannot run: no images, mismatched models, a foreign run folder."""


@dataclass(frozen=True)
class LossWeights:
    """Weight of each distillation term; 0 switches a term off."""

    embedding: float = 1.0
    tokens: float = 1.0
    output: float = 1.0

    def any_decoder_term(self) -> bool:
        """Whether the decoders must run during training."""
        return self.tokens > 0 or self.output > 0


@dataclass(frozen=True)
class DistillOptions:
    """Everything `distill` is asked to do."""

    teacher: Path
    teacher_arch: str
    images: Path
    out: Path
    student_config: str = "full"
    init: Path | None = None
    seed: int = 1
    decoder_init: str = "teacher"
    epochs: int = 8
    prompts_per_image: int = 64
    rounds: int = 3
    box_fraction: float = 0.5
    lr: float = 1e-4
    weights: LossWeights = field(default_factory=LossWeights)
    mask_loss: str = "logits"
    val_images: Path | None = None
    val_fraction: float = 0.1
    val_prompts: int = 32
    cache: Path | None = None
    device: str = "cpu"
    freeze_decoder: bool = False
    save_every: int = 200
    restart: bool = False

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        keep = ("teacher_arch", "student_config", "seed", "decoder_init", "prompts_per_image", "rounds",
                "box_fraction", "lr", "mask_loss", "val_fraction", "val_prompts", "freeze_decoder")
        d = {k: getattr(self, k) for k in keep}
        d["weights"] = dataclasses.asdict(self.weights)
        d["init"] = str(self.init) if self.init else None
        return d


# ---------------------------------------------------------------------------------------------
# Images and the teacher cache


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted), or `DistillError`."""
    if not folder.is_dir():
        raise DistillError(f"image folder not found: {folder}")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DistillError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return found


def _image_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class TeacherCache:
    """Teacher image embeddings in a memory-mapped float16 array, one row per image.

    `meta.json` names the teacher (checkpoint SHA-256 and architecture) and the images (path, size,
    modification time); a cache made for another teacher or image list is rebuilt. Rows are marked
    done as they are written, so an interrupted fill resumes where it stopped."""

    def __init__(self, folder: Path, teacher_id: dict, images: list[Path], shape: tuple[int, int, int]):
        self.folder = folder
        self.images = images
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"teacher": teacher_id, "images": [_image_key(p) for p in images], "shape": list(shape),
                "dtype": "float16"}
        meta_path = folder / "meta.json"
        fresh = not meta_path.is_file() or json.loads(meta_path.read_text()) != meta
        emb_path, done_path = folder / "embeddings.npy", folder / "done.npy"
        if fresh or not emb_path.is_file() or not done_path.is_file():
            if meta_path.is_file():
                log.warning("teacher cache %s was made for another teacher or image list: rebuilding", folder)
            meta_path.unlink(missing_ok=True)
            self.embeddings = np.lib.format.open_memmap(emb_path, "w+", np.float16, (len(images), *shape))
            self.done = np.lib.format.open_memmap(done_path, "w+", np.bool_, (len(images),))
            self.done[:] = False
            self.done.flush()
            meta_path.write_text(json.dumps(meta, indent=1))
        else:
            self.embeddings = np.lib.format.open_memmap(emb_path, "r+")
            self.done = np.lib.format.open_memmap(done_path, "r+")

    def missing(self) -> list[int]:
        """Rows not yet computed."""
        return [int(i) for i in np.flatnonzero(~self.done)]

    @torch.no_grad()
    def fill(self, teacher: Sam, device: torch.device) -> int:
        """Compute the missing rows with the teacher's encoder; returns how many it computed."""
        todo = self.missing()
        for i in tqdm(todo, desc="teacher embeddings", unit="img", disable=None):
            x = load_input(self.images[i], teacher.cfg)
            self.embeddings[i] = teacher.image_encoder(x.to(device)).squeeze(0).cpu().numpy().astype(np.float16)
            self.done[i] = True
            if i % 16 == 0:
                self.embeddings.flush()
                self.done.flush()
        self.embeddings.flush()
        self.done.flush()
        return len(todo)

    def get(self, i: int, device: torch.device) -> torch.Tensor:
        """(1, D, e, e) float32 embedding of image `i`."""
        if not self.done[i]:
            raise DistillError(f"teacher cache has no embedding for {self.images[i]}")
        return torch.from_numpy(np.asarray(self.embeddings[i], np.float32)).unsqueeze(0).to(device)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, or `ImageError` naming the file."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from e


def load_input(path: Path, cfg: ModelConfig) -> torch.Tensor:
    """Preprocessed (1, 3, S, S) tensor of an image file."""
    return torch.from_numpy(preprocess(read_rgb(path).rgb, cfg))


# ---------------------------------------------------------------------------------------------
# Prompts


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, H, W) low-resolution boolean masks -> (P, 2, 2) model-pixel box corners and a (P,) flag
    of which masks are non-empty (one low-resolution cell is 4 model pixels)."""
    p = masks.shape[0]
    boxes = torch.zeros((p, 2, 2))
    ok = masks.flatten(1).any(1)
    for i in torch.nonzero(ok).flatten().tolist():
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        boxes[i, 0] = torch.tensor([xs.min() * 4.0, ys.min() * 4.0])
        boxes[i, 1] = torch.tensor([xs.max() * 4.0 + 3.0, ys.max() * 4.0 + 3.0])
    return boxes, ok


@torch.no_grad()
def box_some_prompts(prompts: Prompts, teacher: Decoding, chosen: torch.Tensor) -> torch.Tensor:
    """Turn the `chosen` (P,) prompts into boxes around the teacher's best answer to them, where
    that answer is not empty; returns which prompts became boxes."""
    masks, iou, _ = teacher(prompts)
    best = masks[torch.arange(len(iou), device=iou.device), iou.argmax(1)]
    boxes, ok = boxes_from_masks((best > 0).cpu())
    take = chosen & ok
    prompts.coords[take] = boxes[take]
    prompts.labels[take] = torch.tensor([2.0, 3.0])
    return take


def sample_hard_points(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new point per prompt where the student's mask is wrong (hard prompt sampling).

    `student`, `teacher`: (P, H, W) boolean low-resolution masks; `valid`: (H, W) boolean image area.
    Of the two error regions — teacher-only pixels (missed) and student-only pixels (spurious) — the
    larger one is sampled uniformly: a missed pixel gives a positive point (label 1), a spurious one
    a negative point (label 0). A prompt the student already answers exactly gets a padding point
    (label -1). Returns (P, 2) model-pixel coords at the chosen cells' centres and (P,) labels."""
    p, _, w = student.shape
    missed = teacher & ~student & valid
    spurious = student & ~teacher & valid
    coords = torch.zeros((p, 2))
    labels = torch.full((p,), -1.0)
    n_missed = missed.flatten(1).sum(1)
    n_spurious = spurious.flatten(1).sum(1)
    for i in range(p):
        if n_missed[i] == 0 and n_spurious[i] == 0:
            continue
        positive = bool(n_missed[i] >= n_spurious[i])
        region = (missed if positive else spurious)[i].flatten()
        cells = torch.nonzero(region).flatten()
        cell = int(cells[torch.randint(len(cells), (1,), generator=gen)])
        coords[i] = torch.tensor([(cell % w) * 4.0 + 1.5, (cell // w) * 4.0 + 1.5])
        labels[i] = 1.0 if positive else 0.0
    return coords, labels


def valid_cells(valid: tuple[int, int], size: int) -> torch.Tensor:
    """(size, size) boolean low-resolution map of the image area (the rest is padding)."""
    h, w = (math.ceil(v / 4) for v in valid)
    out = torch.zeros((size, size), dtype=torch.bool)
    out[:h, :w] = True
    return out


# ---------------------------------------------------------------------------------------------
# Models and losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over the last two axes."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean((-2, -1))


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the last two axes."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two axes (1 where both are empty)."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class RoundResult:
    """Loss terms of one prompt round and the student's masks matched to the teacher's best."""

    tokens: torch.Tensor
    output: torch.Tensor
    student_masks: torch.Tensor
    teacher_masks: torch.Tensor


def round_losses(student: Decoding, teacher: Decoding, prompts: Prompts, mask_loss: str) -> RoundResult:
    """Both decoders on `prompts`; token distance and output loss of the student."""
    with torch.no_grad():
        t_masks, t_iou, t_tokens = teacher(prompts)
    s_masks, s_iou, s_tokens = student(prompts)
    rows = torch.arange(t_masks.shape[0], device=t_masks.device)
    target = t_masks[rows, t_iou.argmax(1)] > 0
    with torch.no_grad():
        match = mask_iou(s_masks > 0, target[:, None]).argmax(1)
    tokens = F.mse_loss(s_tokens, t_tokens)
    if mask_loss == "logits":  # distance of all three logit maps, index by index
        output = F.mse_loss(s_masks, t_masks)
    else:  # "focal-dice": SAM's mask loss, the student's closest mask against the teacher's best
        chosen = s_masks[rows, match]
        t = target.float()
        output = (FOCAL_WEIGHT * focal_loss(chosen, t) + dice_loss(chosen, t)).mean()
    output = output + F.mse_loss(s_iou, t_iou)
    return RoundResult(tokens, output, s_masks[rows, match].detach() > 0, target)


# ---------------------------------------------------------------------------------------------
# The run


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda: PyTorch sees no CUDA device (a CPU-only torch, or no GPU)")
    if name not in ("cpu", "cuda"):
        raise DistillError(f"--device {name}: expected cpu or cuda")
    return torch.device(name)


def _check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
    for attr in ("image_size", "prompt_embed_dim"):
        if getattr(teacher, attr) != getattr(student, attr):
            raise DistillError(
                f"teacher {teacher.name} and student {student.name} differ in {attr} "
                f"({getattr(teacher, attr)} vs {getattr(student, attr)}): the embeddings cannot be compared"
            )


def _copy_decoder(teacher: Sam, student: Sam) -> None:
    """Start the student's prompt encoder and mask decoder from the teacher's (as TinySAM and
    MobileSAM do): both follow SAM's layout, so this needs equal widths."""
    for part in ("prompt_encoder", "mask_decoder"):
        src, dst = getattr(teacher, part).state_dict(), getattr(student, part).state_dict()
        bad = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
        if bad:
            raise DistillError(f"cannot start the student's {part} from the teacher's: {bad[:4]} differ")
        getattr(student, part).load_state_dict(src)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class JsonLog:
    """Append-only JSON-lines log (`OUT/log.jsonl`)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, step: int, epoch: int) -> None:
        """Forget what a stopped run logged after its saved state (steps past `step`, evaluations
        past `epoch`): the resumed run logs them again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            event = json.loads(line)
            if event.get("step", 0) <= step and event.get("epoch", 0) <= epoch + (event["event"] == "train"):
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **event) -> None:
        event["time"] = round(time.time(), 3)
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


@torch.no_grad()
def evaluate(student: Sam, teacher: Sam, cache: TeacherCache, rows: list[int], valid: list[tuple[int, int]],
             prompts_per_image: int, seed: int, device: torch.device) -> dict:
    """Mask IoU of the student against the teacher on held-out images, fixed seeded prompts (half
    points, half boxes around the teacher's answer). `miou`: each model's top-scored mask, as a user
    sees it; `miou_best`: the student's closest of its three."""
    ious, best, is_box = [], [], []
    for row, hw in zip(rows, valid):
        gen = torch.Generator().manual_seed(seed * 100_003 + row)
        x = load_input(cache.images[row], student.cfg)
        s_dec = Decoding(student, student.image_encoder(x.to(device)))
        t_dec = Decoding(teacher, cache.get(row, device))
        prompts = random_point_prompts(prompts_per_image, hw, gen)
        first_half = torch.arange(prompts_per_image) < prompts_per_image // 2
        take = box_some_prompts(prompts, t_dec, first_half)
        t_masks, t_iou, _ = t_dec(prompts)
        cells = valid_cells(hw, t_masks.shape[-1]).to(device)
        s_masks, s_iou, _ = s_dec(prompts)
        rows_ = torch.arange(len(t_iou), device=device)
        target = (t_masks[rows_, t_iou.argmax(1)] > 0) & cells
        top = (s_masks[rows_, s_iou.argmax(1)] > 0) & cells
        ious.append(mask_iou(top, target).cpu())
        best.append(mask_iou((s_masks > 0) & cells, target[:, None]).max(1).values.cpu())
        is_box.append(take)
    iou, boxed = torch.cat(ious), torch.cat(is_box)

    def mean(t: torch.Tensor) -> float | None:
        return float(t.mean()) if len(t) else None

    return {"miou": mean(iou), "miou_best": mean(torch.cat(best)), "miou_points": mean(iou[~boxed]),
            "miou_boxes": mean(iou[boxed])}


def distill(opts: DistillOptions) -> dict:
    """Run (or resume) a distillation; returns the summary also written to `OUT/summary.json`."""
    if opts.student_config not in CONFIGS:
        raise DistillError(f"unknown student config {opts.student_config!r} (have {', '.join(CONFIGS)})")
    if opts.teacher_arch not in TEACHER_CONFIGS:
        raise DistillError(f"unknown teacher architecture {opts.teacher_arch!r} (have {', '.join(TEACHER_CONFIGS)})")
    if opts.mask_loss not in ("logits", "focal-dice"):
        raise DistillError(f"unknown mask loss {opts.mask_loss!r} (logits or focal-dice)")
    if opts.decoder_init not in ("teacher", "student"):
        raise DistillError(f"--decoder-init {opts.decoder_init!r}: expected teacher or student")
    w = opts.weights
    if min(w.embedding, w.tokens, w.output) < 0 or not any(math.isfinite(v) and v > 0 for v in
                                                            (w.embedding, w.tokens, w.output)):
        raise DistillError(f"loss weights must be finite, non-negative and not all zero: {w}")
    if opts.epochs < 1 or opts.prompts_per_image < 1 or opts.rounds < 1 or not 0 <= opts.box_fraction <= 1:
        raise DistillError("--epochs, --prompts-per-image and --rounds must be >= 1, --box-fraction in [0, 1]")
    if not 0 < opts.val_fraction < 1 or opts.val_prompts < 1:
        raise DistillError(f"--val-fraction must be in (0, 1) and --val-prompts >= 1, not {opts.val_fraction} and "
                           f"{opts.val_prompts}")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise DistillError(f"--lr must be a positive number, not {opts.lr}")
    device = _pick_device(opts.device)
    tcfg, scfg = TEACHER_CONFIGS[opts.teacher_arch], CONFIGS[opts.student_config]
    _check_compatible(tcfg, scfg)

    train_paths = list_images(opts.images)
    if opts.val_images is not None:
        val_paths = list_images(opts.val_images)
    else:
        if len(train_paths) < 2:
            raise DistillError(f"{opts.images} has one image: give --val-images, or more images to hold some out")
        n_val = max(1, round(opts.val_fraction * len(train_paths)))
        order = torch.randperm(len(train_paths), generator=torch.Generator().manual_seed(opts.seed)).tolist()
        held = set(order[:n_val])
        val_paths = [p for i, p in enumerate(train_paths) if i in held]
        train_paths = [p for i, p in enumerate(train_paths) if i not in held]
    log.info("%d training images, %d held out", len(train_paths), len(val_paths))

    opts.out.mkdir(parents=True, exist_ok=True)
    teacher = load_checkpoint(tcfg, opts.teacher).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_id = {"arch": opts.teacher_arch, "sha256": file_sha256(opts.teacher)}
    all_paths = train_paths + val_paths
    e = tcfg.embedding_size
    cache = TeacherCache(opts.cache or opts.out / "teacher-cache", teacher_id, all_paths, (tcfg.prompt_embed_dim, e, e))
    computed = cache.fill(teacher, device)
    log.info("teacher embeddings: %d computed, %d from the cache", computed, len(all_paths) - computed)
    teacher.image_encoder = None  # never needed again: free its memory

    valid = [resized_size(*image_size(p), scfg.image_size) for p in all_paths]
    val_rows = list(range(len(train_paths), len(all_paths)))
    state_path, student_path = opts.out / "state.pt", opts.out / "student.pth"
    jlog = JsonLog(opts.out / "log.jsonl")
    fingerprint = {**opts.fingerprint(), "teacher": teacher_id, "images": [_image_key(p) for p in all_paths]}

    student = load_checkpoint(scfg, opts.init) if opts.init else synthetic_model(scfg, opts.seed)
    if opts.init is None and opts.decoder_init == "teacher":
        _copy_decoder(teacher, student)
    # Eval mode throughout: BatchNorm keeps its statistics (one image a step is too few for batch
    # statistics) and nothing in these models behaves otherwise differently in training.
    student = student.to(device).eval()
    trained = student.image_encoder.parameters() if opts.freeze_decoder else student.parameters()
    optimizer = torch.optim.Adam(trained, lr=opts.lr)
    start_epoch, start_index, before = 0, 0, None
    if state_path.is_file() and not opts.restart:
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise DistillError(
                f"{opts.out} holds a run with other settings, teacher or images: rerun with --restart to "
                f"start over there, or choose another --out"
            )
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_index, before = state["epoch"], state["index"], state["before"]
        log.info("resuming %s at epoch %d, image %d", opts.out, start_epoch + 1, start_index)
        jlog.truncate(start_epoch * len(train_paths) + start_index, start_epoch)
    elif opts.restart:
        (opts.out / "log.jsonl").unlink(missing_ok=True)
    def held_out() -> dict:
        return evaluate(student, teacher, cache, val_rows, [valid[r] for r in val_rows], opts.val_prompts,
                        opts.seed, device)

    def save_state(epoch: int, index: int) -> None:
        _atomic_save({"student": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                      "index": index, "before": before, "fingerprint": fingerprint}, state_path)

    if before is None:
        before = held_out()
        jlog.write(event="eval", epoch=0, **before)
        log.info("before: held-out mIoU vs teacher %.3f (best of 3: %.3f)", before["miou"], before["miou_best"])

    steps_per_epoch = len(train_paths)
    total_steps = opts.epochs * steps_per_epoch
    after = before
    for epoch in range(start_epoch, opts.epochs):
        order = torch.randperm(steps_per_epoch, generator=torch.Generator().manual_seed(opts.seed + 7919 * epoch))
        bar = tqdm(range(start_index, steps_per_epoch), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="img",
                   disable=None)
        for index in bar:
            step = epoch * steps_per_epoch + index
            for group in optimizer.param_groups:  # cosine decay to a tenth of the rate
                group["lr"] = opts.lr * (0.55 + 0.45 * math.cos(math.pi * step / max(total_steps, 1)))
            row = int(order[index])
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
            loss, terms = train_step(student, teacher, cache, row, valid[row], opts, gen, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
            jlog.write(event="train", epoch=epoch + 1, step=step + 1, **terms)
            if (index + 1) % opts.save_every == 0 and index + 1 < steps_per_epoch:
                save_state(epoch, index + 1)
        start_index = 0
        after = held_out()
        jlog.write(event="eval", epoch=epoch + 1, **after)
        log.info("epoch %d: held-out mIoU vs teacher %.3f (best of 3: %.3f)", epoch + 1, after["miou"],
                 after["miou_best"])
        _atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, student_path)
        save_state(epoch + 1, 0)
    summary = {"before": before, "after": after, "epochs": opts.epochs, "train_images": len(train_paths),
               "val_images": len(val_paths), "student": str(student_path), "student_config": scfg.name,
               "teacher_arch": opts.teacher_arch, "weights": dataclasses.asdict(opts.weights),
               "teacher_embeddings_computed": computed}
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_step(student: Sam, teacher: Sam, cache: TeacherCache, row: int, valid: tuple[int, int],
               opts: DistillOptions, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Forward passes and losses of one image: the weighted loss and each term's value."""
    w = opts.weights
    x = load_input(cache.images[row], student.cfg)
    s_emb = student.image_encoder(x.to(device))
    t_emb = cache.get(row, device)
    loss = torch.zeros((), device=device)
    terms: dict[str, float] = {}
    if w.embedding > 0:
        emb = F.mse_loss(s_emb, t_emb)
        loss = loss + w.embedding * emb
        terms["embedding"] = float(emb.detach())
    if w.any_decoder_term():
        s_dec, t_dec = Decoding(student, s_emb), Decoding(teacher, t_emb)
        prompts = random_point_prompts(opts.prompts_per_image, valid, gen)
        box_some_prompts(prompts, t_dec, torch.rand(opts.prompts_per_image, generator=gen) < opts.box_fraction)
        cells = valid_cells(valid, student.cfg.low_res_mask_size)
        tok_sum = out_sum = torch.zeros((), device=device)
        for r in range(opts.rounds):
            res = round_losses(s_dec, t_dec, prompts, opts.mask_loss)
            tok_sum = tok_sum + res.tokens
            out_sum = out_sum + res.output
            if r + 1 < opts.rounds:
                coords, labels = sample_hard_points(res.student_masks.cpu(), res.teacher_masks.cpu(), cells, gen)
                prompts = prompts.append(coords, labels)
        loss = loss + (w.tokens * tok_sum + w.output * out_sum) / opts.rounds
        terms["tokens"] = float(tok_sum.detach()) / opts.rounds
        terms["output"] = float(out_sum.detach()) / opts.rounds
    return loss, terms
