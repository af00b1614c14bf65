"""Runs and scores on the toy world's instance subjects (`subjects.py`) at a
given identifier salience (`salience.py`): the harness behind the
calibration (`calibrate.py`) and the calibrated measurements. Each run's
scores are cached beside it (score.json), so an interrupted study redoes
nothing; every figure is per seed, raw, for the reports to aggregate."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..core.fileio import save_png, write_json
from ..evaluation.metrics import cosine_matrix, mean_pairwise_within
from ..generation import Setting, draw, load_pipeline
from ..training.loop import train
from .instance import InstanceJudge
from .judges import toy_judge
from .salience import calibrated_model
from .subjects import Subject

log = logging.getLogger(__name__)
NEW_CONTEXTS = ("snow", "room")  # never in the subject's photos (grass, beach)
# The toy-scaled training of docs/toyworld.md at half its 400 steps, and 16
# class images (claims: 16 and 64 alike): what 2 shared cores allow.
BASE_TRAIN = {"steps": 200, "batch_size": 4, "lr": 1e-3, "lr_text": 1e-4, "rank": 4}
CLASS_IMAGES = {"prior_preservation": "images", "num_class_images": 16, "prior_loss_weight": 1.0}
METHODS = {  # TrainConfig fields over BASE_TRAIN
    "no-prior": {},
    "class-image-prior": CLASS_IMAGES,
    "image-free-prior": {**CLASS_IMAGES, "prior_preservation": "model"},
    "pivotal": {**CLASS_IMAGES, "train_token": True},
}
# the image-free prior two ways: lorabooth's `model` (fresh noise and timestep,
# the class prompt) against ai-toolkit's differential output preservation
# (`dop`: the instance rows' own noisy latents, the caption without the identifier)
PRIOR_VARIANTS = {"dop-prior": {**CLASS_IMAGES, "prior_preservation": "dop"}}
# issue 28: the frozen base stored quantised (--base-precision), the LoRA fp32 on
# top; against the same recipe on the unquantised base, same seeds
PRECISION_VARIANTS = {"int8-base": {**CLASS_IMAGES, "base_precision": "int8"},
                      "nf4-base": {**CLASS_IMAGES, "base_precision": "nf4"}}
# issue 29: the loss weighted by the subject's exact mask (the renderer knows
# it), 0.1 outside as OneTrainer's default; with the masked prior too
MASK_VARIANTS = {"masked-loss": {**CLASS_IMAGES, "masked_loss": True},
                 "masked-prior": {**CLASS_IMAGES, "masked_loss": True,
                                  "masked_prior_weight": 1.0}}
LEVERS = {  # each on the calibrated class-image recipe
    "min-snr-5": {**CLASS_IMAGES, "snr_gamma": 5.0},
    "noise-offset-0.05": {**CLASS_IMAGES, "noise_offset": 0.05},
    "dora": {**CLASS_IMAGES, "adapter": "dora"},
    "caption-dropout-0.1": {**CLASS_IMAGES, "caption_dropout": 0.1},
    "ema-0.99": {**CLASS_IMAGES, "ema_decay": 0.99},
}


@dataclass(frozen=True)
class Cell:
    """One training run: a subject, a method, a world salience, a seed."""
    subject: Subject
    method: str
    train: dict
    salience: float
    seed: int

    @property
    def name(self) -> str:
        return f"s{self.salience:g}/{self.subject.name}/{self.method}-seed{self.seed}"


@dataclass
class Harness:
    out: Path
    images: int = 4  # per prompt
    sample_steps: int = 12  # DPM-Solver
    train_over: dict = field(default_factory=dict)  # over BASE_TRAIN, e.g. fewer steps

    def __post_init__(self):
        self.judge = toy_judge()
        self._instance: InstanceJudge | None = None

    @property
    def instance(self) -> InstanceJudge:
        from ..models.loading import toy_model_dir

        if self._instance is None:
            self._instance = InstanceJudge.load(toy_model_dir() / "instance.safetensors", self.judge)
        return self._instance

    def model(self, salience: float) -> Path:
        return calibrated_model(self.out / "models" / f"salience-{salience:g}", salience)

    def photos(self, subject: Subject) -> Path:
        """The subject's photos, each with its exact mask (view_i.mask.png,
        read only by --masked-loss; added beside photos of an older study)."""
        folder = self.out / "photos" / subject.name
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for i, image in enumerate(subject.views()):
                save_png(image, folder / f"view_{i}.png")
        for i, mask in enumerate(subject.masks()):
            if not (folder / f"view_{i}.mask.png").is_file():
                save_png(mask, folder / f"view_{i}.mask.png")
        return folder

    def config(self, cell: Cell) -> TrainConfig:
        # class images hold no identifier: one set per class and seed serves every salience
        return TrainConfig(**{
            "model": str(self.model(cell.salience)), "instance_dir": str(self.photos(cell.subject)),
            "seed": cell.seed, "output": str(self.out / "runs" / cell.name),
            "instance_prompt": f"a photo of sks {cell.subject.cls}",
            "class_prompt": f"a photo of a {cell.subject.cls}",
            "class_dir": str(self.out / "class_images" / f"{cell.subject.cls}-seed{cell.seed}"),
            "class_draw_steps": self.sample_steps, "class_draw_batch": 16,
            **BASE_TRAIN, **self.train_over, **cell.train})

    def run(self, cell: Cell) -> dict:
        """Train (once) and score (once) one cell; the raw record."""
        config = self.config(cell)
        folder = Path(config.output)
        done = folder / "score.json"
        while not done.is_file() and not self._claim(cell):
            time.sleep(10)  # another phase's process runs it: wait for its scores
        if done.is_file():
            return json.loads(done.read_text())
        t0 = time.perf_counter()
        trained = folder / "train_seconds.json"
        if trained.is_file():  # trained by an earlier invocation, not yet scored
            train_s = json.loads(trained.read_text())["seconds"]
        else:
            train(config)
            train_s = time.perf_counter() - t0
            write_json(trained, {"seconds": round(train_s, 1)})
        pipe, has_text = load_pipeline(folder)
        record = {"subject": cell.subject.name, "method": cell.method, "salience": cell.salience,
                  "seed": cell.seed, "train_seconds": round(train_s, 1),
                  **self.score(pipe, has_text, cell.subject, Setting(1, 1, 5.0))}
        record["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(done, record)
        log.info("%s: %s", cell.name, {k: v for k, v in record.items() if isinstance(v, float)})
        return record

    def _claim(self, cell: Cell) -> bool:
        """Whether this process may run ``cell``: phases may run side by side
        and share cells; the first to claim one runs it. A claim whose
        process is gone (crashed, killed) is taken over."""
        claim = self.out / "claims" / cell.name.replace("/", "__")
        claim.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = int(claim.read_text() or 0)
            if owner == os.getpid() or not _alive(owner):
                claim.write_text(str(os.getpid()))
                return True
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def base_record(self, subject: Subject, salience: float) -> dict:
        """The base model on the same prompts: the no-prior seed-0 run's
        pipeline at LoRA scale 0 (as `toyworld claims` does); once per subject."""
        path = self.out / "base" / f"s{salience:g}-{subject.name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        cell = Cell(subject, "no-prior", METHODS["no-prior"], salience, 0)
        self.run(cell)
        pipe, has_text = load_pipeline(self.config(cell).output)
        record = {"subject": subject.name, "method": "base", "salience": salience,
                  **self.score(pipe, has_text, subject, Setting(0, 0, 5.0))}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return record

    def score(self, pipe, has_text, subject: Subject, setting: Setting) -> dict:
        """Identity (the judges' embedding, the toy DINO) and instance
        similarity to the subject's photos, each also over the photos' own
        leave-one-out similarity (the paper's 'real images' row); subject
        rate, context accuracy, background leakage (the share of drawings in
        a new context judged to show a photo's background); PRES and DIV on
        the bare class prompt."""
        views = subject.views()
        ref_id, ref_inst = self.judge.identity(views), self.instance.embed(views)
        seeds = list(range(self.images))
        ident, inst, subj, ctx, leak = [], [], [], [], []
        for context in NEW_CONTEXTS:
            where = "in the" if context == "room" else "on the"
            images = draw(pipe, has_text, f"a photo of sks {subject.cls} {where} {context}",
                          setting, seeds, self.sample_steps)
            ident.append(cosine_matrix(self.judge.identity(images), ref_id).mean().item())
            inst.append(cosine_matrix(self.instance.embed(images), ref_inst).mean().item())
            for p in self.judge.predict(images):
                subj.append(p["colour"] == subject.colour and p["pattern"] == subject.pattern)
                ctx.append(p["context"] == context)
                leak.append(p["context"] in subject.photo_contexts)
        bare = draw(pipe, has_text, f"a photo of a {subject.cls}", setting, seeds, self.sample_steps)
        bare_id = self.judge.identity(bare)
        return {
            "identity": sum(ident) / len(ident), "instance": sum(inst) / len(inst),
            "real_identity": mean_pairwise_within(ref_id),
            "real_instance": mean_pairwise_within(ref_inst),
            "subject_rate": sum(subj) / len(subj), "context_acc": sum(ctx) / len(ctx),
            # background leakage: drawn in a new context, judged to be in a photo's
            "leakage": sum(leak) / len(leak),
            "pres": cosine_matrix(bare_id, ref_id).mean().item(),
            "pres_instance": cosine_matrix(self.instance.embed(bare), ref_inst).mean().item(),
            "div": 1 - mean_pairwise_within(bare_id),
            "class_right": sum(p["cls"] == subject.cls for p in self.judge.predict(bare)) / len(bare),
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0
