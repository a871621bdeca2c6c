"""The reader of a ``prism study`` result (``study.json``) for ``prism test``'s routing analysis.

It lives in evaluation, below the study that writes the file, so that evaluation never imports the study.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prism_lightning.utils.errors import PrismError


@dataclass(frozen=True)
class StudyEffect:
    """One condition's scores and the no-persona scores from a ``study.json``, for ``prism test``'s routing analysis."""

    path: str
    condition: str
    fingerprint: Optional[str]
    none: dict
    matched: dict

    @classmethod
    def read(cls, path: str, condition: str) -> "StudyEffect":
        """Read and check the file now, before any model work: one line naming the file on any problem."""
        try:
            study = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrismError(f"data.benchmark.persona_effect: {path} not found (run `prism study` first)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrismError(f"data.benchmark.persona_effect: {path} is not a study.json ({exc})") from None
        scores: dict[str, dict] = {}
        for cell in study.get("cells", []) if isinstance(study, dict) else []:
            scores.setdefault(cell.get("condition", {}).get("name"), {}).update(cell.get("scores", {}))
        if "none" not in scores or condition not in scores:
            raise PrismError(f"data.benchmark.persona_effect: {path} has no {condition!r} cells next to 'none' "
                             f"(conditions: {', '.join(k for k in scores if k)}); study this run's granularity and "
                             f"placement")
        return cls(path, condition, study.get("fingerprint"), scores["none"], scores[condition])

    def scores(self, fingerprint: Optional[str]) -> tuple[dict, dict]:
        """(no persona, condition) scores per subcategory; the study must be of the same base weights."""
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise PrismError(f"data.benchmark.persona_effect: {self.path} studied base weights {self.fingerprint}, "
                             f"this run's are {fingerprint}")
        nan = float("nan")
        return ({k: nan if v is None else v for k, v in self.none.items()},
                {k: nan if v is None else v for k, v in self.matched.items()})

    @property
    def source(self) -> str:
        """Where the routing analysis's persona effect came from, as the report states it."""
        return f"prism study {self.path} ({self.condition} vs none)"
