"""The progress line of every script: one line per epoch and per round, with the elapsed time and an ETA from
the costs measured so far in the run (common.py re-exports Progress and fmt_s; scripts call common.Progress)."""
import time


class Progress:
    """One line per epoch and per round: loss, Dice, elapsed and the ETA.

    Progress(run, total_epochs, done_epochs, plan=...): plan holds the work of every round 0, 1, ..., as
    (images trained, epochs, pool images scored), e.g. Progress.plan(...) for the usual protocol. The ETA is
    then the work still planned at the costs measured so far in this run:
      training:  training seconds / (images x epochs trained)     x  images x epochs still planned
      selection: selection seconds / pool images scored            x  pool images still to score
      the rest:  seconds per round outside both (test, checkpoint, figures)  x  rounds still to finish
    so it counts the selection time and the labelled set growing from round to round, which epochs alone do
    not. The first epoch of a run has no ETA (None, printed `ETA --`): its time holds the set-up and the
    warm-up (on a GPU, CUDA's kernels and cuDNN's search: 18 s against 0.1 s for each later epoch of the
    polyp protocol's round 0 on an H100); the run's first round measures training by its epochs after the
    first, and a resumed run starts from the costs of its finished rounds. Until some round has scored its
    pool, scoring an image is taken to cost one training image-epoch; in a round that scores, the time from
    the last round's end to its first epoch, less that epoch at the measured training cost, stands in for its
    selection time until the round reports select_s (not in a resumed process's first round, whose gap also
    holds the start-up and, on a GPU, the warm-up: there the finished rounds' selection cost stands).
    Without a plan: the epochs still planned at the mean epoch time so far (selection time unseen)."""

    def __init__(self, run, total_epochs=1, done_epochs=0, plan=None):
        self.run, self.total, self.done = run, max(1, total_epochs), done_epochs
        self.t_start, self.done_start = time.time(), done_epochs
        self.work = [tuple(int(v) for v in w) for w in plan] if plan else None
        self.train_s = self.train_ie = self.select_s = self.select_n = self.other_s = 0.0
        self.other_rounds, self.finished, self.cur, self.t_round = 0, -1, None, self.t_start
        rows = run.read_csv("rounds.csv") if self.work else []
        for row in rows:  # --resume: the costs of the rounds done
            self._measured(row)
        self.resumed = bool(rows)

    @staticmethod
    def plan(initial, query, rounds, epochs_initial, epochs, pool, scored=True, pseudo=None, redraw=False):
        """The usual protocol's work per round: round 0 trains `initial` images for `epochs_initial` epochs;
        round r >= 1 scores the `pool` images still unlabelled (none if not `scored`, e.g. random), moves
        `query` of them to the labelled set and trains it, plus pseudo(r) pseudo-labelled images (CEAL: those
        new in round r leave the pool; with redraw, round r's are drawn afresh and stay in it), as many as the
        pool holds beside the query (ceal_groups' default pick), for `epochs`. Stops where the pool runs out, as
        the scripts do. pool: the images unlabelled after round 0."""
        work, n, left, before = [(initial, epochs_initial, 0)], initial, pool, 0
        for r in range(1, rounds + 1):
            if left <= 0:
                break
            q, want = min(left, query), int(pseudo(r)) if pseudo else 0
            now = min(want, left - q) if redraw else before + min(want - before, left - q)
            work.append((n + q + now, epochs, left if scored else 0))
            n, left, before = n + q, left - q - (0 if redraw else now - before), now
        return work

    def _work(self, rnd):
        return self.work[rnd] if 0 <= rnd < len(self.work) else (0, 0, 0)

    def _measured(self, row, wall=None):
        n, e, s = self._work(int(row["round"]))
        train_s, select_s = float(row["train_s"]), float(row["select_s"])
        self.train_s, self.train_ie = self.train_s + train_s, self.train_ie + n * e
        if s:
            self.select_s, self.select_n = self.select_s + select_s, self.select_n + s
        if wall is not None:
            self.other_s, self.other_rounds = self.other_s + max(0.0, wall - train_s - select_s), self.other_rounds + 1
        self.finished = max(self.finished, int(row["round"]))

    def eta_s(self, now=None):
        """Seconds still to go (see the class doc); None after the first epoch of a run, with nothing measured."""
        now = time.time() if now is None else now
        if not self.work:
            return (now - self.t_start) / max(1, self.done - self.done_start) * max(0, self.total - self.done)
        ts, tie, ss, sn = self.train_s, self.train_ie, self.select_s, self.select_n
        left_ie = left_n = 0
        first = self.finished + 1  # the first round not started
        if self.cur is not None:   # a round in training: [round, epochs done, its epochs, first epoch's end, last's]
            rnd, k, epochs, t_first, t_last = self.cur
            n, _, s = self._work(rnd)
            if k >= 2:  # its epochs after the first: training only
                ts, tie = ts + t_last - t_first, tie + (k - 1) * n
            gap = t_first - self.t_round  # its selection and its first epoch
            if not tie:  # the run's first epoch alone: warm-up, not a rate
                return None
            if s and not (self.resumed and self.t_round == self.t_start):  # a resumed process's first round: its
                ss, sn = ss + max(0.0, gap - ts / tie * n), sn + s  # gap holds start-up and warm-up too, not a rate
            left_ie, first = max(0, epochs - k) * n, rnd + 1
        for n, e, s in self.work[first:]:
            left_ie, left_n = left_ie + n * e, left_n + s
        rate_train = ts / tie if tie else 0.0
        rate_select = ss / sn if sn else rate_train
        other = self.other_s / self.other_rounds if self.other_rounds else 0.0
        rounds_left = max(0, len(self.work) - (self.cur[0] if self.cur is not None else first))
        return rate_train * left_ie + rate_select * left_n + other * rounds_left

    def _eta(self):
        eta = self.eta_s()
        return "--" if eta is None else fmt_s(eta)

    def epoch(self, rnd, epoch, epochs, loss, **cols):
        """A finished epoch: its row of epochs.csv (round, epoch, loss, and the script's own columns cols, e.g.
        CEAL's val_dice) and the progress line."""
        self.run.append_csv("epochs.csv", {"round": rnd, "epoch": epoch + 1, "loss": loss, **cols})
        val_dice = cols.get("val_dice")
        self.done += 1
        now = time.time()
        if self.cur is None or self.cur[0] != rnd:
            self.cur = [rnd, 0, epochs, now, now]
        self.cur[1:] = [epoch + 1, epochs, self.cur[3], now]
        vd = "" if val_dice is None else f" val_dice {val_dice:.3f}"
        print(f"  round {rnd} epoch {epoch + 1}/{epochs} loss {loss:.4f}{vd} | {fmt_s(self.run.elapsed())} "
              f"elapsed, ETA {self._eta()}", flush=True)

    def round(self, row):
        now = time.time()
        if self.work:
            first = self.cur if not self.train_ie and self.cur and self.cur[1] >= 2 else None
            self._measured(row, now - self.t_round)
            if first:  # the run's first round: the rate of its epochs after the first, without the warm-up
                rnd, k, _, t_first, t_last = first
                self.train_s, self.train_ie = t_last - t_first, (k - 1) * self._work(rnd)[0]
        self.t_round, self.cur = now, None
        extra = f" pseudo {row['pseudo']}" if row.get("pseudo") else ""
        print(f"round {row['round']}: labelled {row['labeled']}{extra} test dice {row['dice_mean']:.4f} "
              f"± {row['dice_std']:.4f} iou {row['iou_mean']:.4f} (train {row['train_s']:.1f}s, select "
              f"{row['select_s']:.1f}s) | {fmt_s(self.run.elapsed())} elapsed, ETA {self._eta()}", flush=True)


def fmt_s(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
