"""Scoring (example, plan) pairs in batches: one prefill of the prompt per pair, continuations on top of it.

Stage 1 prefills every pair's prompt along its plan ([R, P] rows of the executor's KV cache) and keeps the
last prompt token's logits: they score the first token of each continuation (and the choice labels of
letter scoring). Stage 2 copies each prompt's cache row once per continuation and runs the continuations'
remaining tokens at positions P.. along the same plan, so all choices of a multiple-choice question share
one prefill of the question — a plan evaluation costs little more than one forward of the question.
Pairs of different examples and plans share one batch; on a GPU, hundreds at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..executor import RoutedExecutor, pad_right
from ..model import BaseModel
from .tasks.scoring import Encoded, PlanScore

Plan = tuple[int, ...]


class PlanScorer:
    """Scores (Encoded, plan) pairs with `model`; `max_rows` bounds the executor batch (prompt rows plus
    continuation rows of one chunk)."""

    def __init__(self, model: BaseModel, max_rows: int = 32, stops: set[int] | None = None,
                 capacity: int = 256) -> None:
        self.model, self.max_rows = model, max_rows
        self.stops = stops or set(model.eos_token_ids)
        self.executor = RoutedExecutor(model, max_batch=max_rows, capacity=capacity)
        self.L = model.spec.n_layers
        self.evals = 0  # plan evaluations (pairs) scored

    @staticmethod
    def _feed(enc: Encoded, c: tuple[int, ...]) -> tuple[int, ...]:
        # the continuation tokens run in stage 2: all but the last (whose successor is not scored), or for
        # short answers all of them (the argmax after the answer must be a stop token)
        return c if enc.kind == "short" else c[:-1]

    def _rows_needed(self, enc: Encoded) -> int:
        return 1 + sum(1 for c in enc.conts if self._feed(enc, c))

    def score(self, items: Sequence[tuple[Encoded, Plan]], progress: bool = False) -> list[PlanScore]:
        """-> one `PlanScore` per (encoded example, plan) pair, in order. Pairs are batched by length
        (longest continuation, then prompt) so that short rows are not padded to long ones. `progress`: a
        tqdm bar over the pairs (stderr)."""
        from tqdm import tqdm

        with tqdm(total=len(items), desc="plan evaluations", unit="eval", disable=not progress, leave=False) as bar:
            return self._score(items, bar)

    def _score(self, items: Sequence[tuple[Encoded, Plan]], bar) -> list[PlanScore]:  # noqa: ANN001 - tqdm
        order = sorted(range(len(items)), key=lambda i: (max((len(c) for c in items[i][0].conts), default=0),
                                                         len(items[i][0].ids)))
        out: list[PlanScore | None] = [None] * len(items)
        chunk: list[int] = []
        rows = 0
        for i in order:
            need = self._rows_needed(items[i][0])
            if need > self.max_rows:
                raise ValueError(f"an example needs {need} rows; the scorer has max_rows={self.max_rows}")
            if rows + need > self.max_rows:
                for j, sc in zip(chunk, self._score_chunk([items[j] for j in chunk]), strict=True):
                    out[j] = sc
                bar.update(len(chunk))
                chunk, rows = [], 0
            chunk.append(i)
            rows += need
        if chunk:
            for j, sc in zip(chunk, self._score_chunk([items[j] for j in chunk]), strict=True):
                out[j] = sc
            bar.update(len(chunk))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_chunk(self, items: list[tuple[Encoded, Plan]]) -> list[PlanScore]:
        ex = self.executor
        dev = self.model.device
        R = len(items)
        tokens, lengths = pad_right([e.ids for e, _ in items])
        plans = torch.tensor([p for _, p in items], dtype=torch.long)
        first = ex.forward(tokens, torch.zeros(R, dtype=torch.long), plans=plans, lengths=lengths)
        last_lp = torch.log_softmax(first.logits.float(), -1)  # [R, V]

        # stage 2: one cache row per continuation with more than one token
        owner, which, cont_rows = [], [], []
        for r, (e, _) in enumerate(items):
            for j, c in enumerate(e.conts):
                if self._feed(e, c):
                    owner.append(r)
                    which.append(j)
                    cont_rows.append(self._feed(e, c))
        lp2: torch.Tensor | None = None
        am2: torch.Tensor | None = None
        tgt2: torch.Tensor | None = None
        if cont_rows:
            C = len(cont_rows)
            dst = torch.arange(R, R + C)
            ex.cache.copy_rows(torch.tensor(owner), dst)
            ctoks, clens = pad_right(cont_rows)
            start = lengths[torch.tensor(owner)]
            res = ex.forward(ctoks, start, plans=plans[torch.tensor(owner)], rows=dst, lengths=clens,
                             all_logits=True)
            logp = torch.log_softmax(res.logits.float(), -1)  # [C, m, V]
            tgt2 = pad_right([items[r][0].conts[j][1:] or (0,) for r, j in zip(owner, which, strict=True)])[0]
            tgt2 = torch.nn.functional.pad(tgt2, (0, logp.shape[1] - tgt2.shape[1])).to(dev)
            lp2 = logp.gather(2, tgt2[..., None]).squeeze(2)  # [C, m]
            am2 = logp.argmax(-1)  # [C, m]
        by_key = {(r, j): k for k, (r, j) in enumerate(zip(owner, which, strict=True))}
        scores: list[PlanScore] = []
        last_lp_cpu = last_lp.cpu()
        last_am = last_lp.argmax(-1).cpu()
        lp2c = lp2.cpu() if lp2 is not None else None
        am2c = am2.cpu() if am2 is not None else None
        tgt2c = tgt2.cpu() if tgt2 is not None else None
        for r, (e, _) in enumerate(items):
            lps, ams = [], []
            stop_ok = True
            for j, c in enumerate(e.conts):
                lp = float(last_lp_cpu[r, c[0]])
                am = int(int(last_am[r]) == c[0])
                if len(c) > 1:
                    assert lp2c is not None and am2c is not None and tgt2c is not None
                    k, m = by_key[(r, j)], len(c) - 1
                    lp += float(lp2c[k, :m].double().sum())
                    am += int((am2c[k, :m] == tgt2c[k, :m]).sum())
                if e.kind == "short":
                    assert am2c is not None
                    stop_ok = int(am2c[by_key[(r, j)], len(c) - 1]) in self.stops
                lps.append(lp)
                ams.append(am)
            labels = tuple(float(first.logits[r, t]) for t in e.labels)
            scores.append(PlanScore(tuple(lps), tuple(ams), labels, stop_ok))
        self.evals += R
        return scores
