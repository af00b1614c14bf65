"""The toy world's subjects for the calibrated studies: instances, each a
(class, colour, pattern) with a mark (its instance detail), split into the
subjects the calibration was fitted on and those it is measured on."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .world import HELD_OUT, MARKS, render, subject_mask, subject_views

VIEW_SEED = 1000  # render seeds of the photos the LoRA is shown: 1000, 1001, ...
HELD_SEED = 2000  # of the subject's held-out views (other contexts, places)


@dataclass(frozen=True)
class Subject:
    cls: str
    colour: str
    pattern: str
    mark: int

    @property
    def combo(self) -> tuple[str, str, str]:
        return self.cls, self.colour, self.pattern

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.pattern}-{self.cls}-mark{self.mark}"

    @property
    def title(self) -> str:
        new = "held-out combination" if self.combo in HELD_OUT else "seen combination, new by its mark"
        return f"{self.colour} {self.pattern} {self.cls}, mark {self.mark} ({new})"

    @property
    def twin_mark(self) -> int:
        """The diagonally opposite place: for a car (marks left or right only)
        the other side too."""
        return len(MARKS) + 1 - self.mark

    def views(self, n: int = 4, mark: int | None = None) -> list[Image.Image]:
        """The photos a user brings: grass and beach."""
        specs = subject_views(self.combo, n=n, mark=self.mark if mark is None else mark)
        return [render(s, VIEW_SEED + i) for i, s in enumerate(specs)]

    def masks(self, n: int = 4) -> list[Image.Image]:
        """The exact subject mask of each of ``views``' photos."""
        return [subject_mask(s) for s in subject_views(self.combo, n=n, mark=self.mark)]

    @property
    def photo_contexts(self) -> set[str]:
        """The backgrounds of the photos the LoRA is shown."""
        return {s.context for s in subject_views(self.combo, mark=self.mark)}

    def held_out_views(self, n: int = 8, mark: int | None = None) -> list[Image.Image]:
        """The same instance (or, with ``mark``, its twin) in the contexts the
        photos never show, at other places: what a perfect generation looks like."""
        specs = subject_views(self.combo, contexts=("snow", "room"), n=n, seed=5,
                              mark=self.mark if mark is None else mark)
        return [render(s, HELD_SEED + i) for i, s in enumerate(specs)]


# Fitted on (docs/calibration.md): one held-out combination, one seen.
CALIBRATION = (Subject("car", "green", "dotted", 1), Subject("kite", "red", "striped", 2))
# Measured on, never fitted on: two held-out combinations, two seen ones.
EVALUATION = (Subject("ball", "purple", "striped", 1), Subject("mug", "orange", "striped", 2),
              Subject("car", "blue", "plain", 4), Subject("kite", "yellow", "dotted", 3))
