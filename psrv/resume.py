"""The coordinator's part of a checkpoint: plain values (lists, ints, floats, str) of everything a restarted server
needs, and putting them back (pure: reads and writes a psrv.coordinator.Coordinator, no files)."""
from __future__ import annotations

from .report import Stats
from .schedule import Schedule


def state(c, now: float) -> dict:
    """Plain values of everything a restarted server needs, with the batches in flight (and those of a BSP
    step not applied yet) handed back to their shards, so that a restart serves them again."""
    schedule = Schedule([cur.size for cur in c.schedule.cursors])
    schedule.load_state(c.schedule.state())
    for batch in [*c.batches.values(), *(r.batch for r in c.step_records)]:
        if batch is not None:
            schedule.give_back(batch)
    # the workers training when this was saved, whom a resume waits for: the gate's members, and once the run is
    # ending those told to stop (at its end none is left in the gate; a resume that raises train.steps and started
    # with fewer would sum fewer workers' batches a step than a run that never stopped). Mid-run, one that finished
    # its epochs early has exited: a restarted server does not wait for it.
    done = c.finished_at if c.stopping else {}
    clocks = {**done, **{w: m.pushed for w, m in c.gate.members.items()}}
    return {"step": c.step, "version": c.version, "gate_step": c.gate.step, "group_steps": c.group_k or 1,
            # a BSP step not applied yet is redone: its pushers resume at that step, not after it
            "clocks": [[w, min(k, c.gate.step) if c.gate.mode == "bsp" else k] for w, k in clocks.items()],
            "incarnations": [[w, i] for w, i in c.members.incarnations.items()],
            "schedule": schedule.state(), "stats": c.stats.to_state(), "elapsed_s": c.elapsed_s(now),
            "deaths": c.members.deaths, "worker_restarts": c.members.restarts,
            "stale_pushes": c.members.stale_pushes, "quarantined": list(c.members.quarantined),
            "loss": c.last_loss, "guard": c.guard.state()}


def restore(c, st: dict) -> None:
    c.version, c.gate.step = st["version"], st["gate_step"]
    c.saved_clocks = {w: k for w, k in st["clocks"]}
    # group steps: BSP's steps done. The gate's clock counts group steps; resumed with another train.group_steps
    # (or none), it starts again from the steps done, where every worker that was training resumes (group steps
    # are BSP: they were all at the gate's step)
    c.bsp_steps = st["step"] if c.group_k else 0
    if st.get("group_steps", 1) != (c.group_k or 1):
        c.gate.step = st["step"]
        c.saved_clocks = {w: st["step"] for w in c.saved_clocks}
    c.n_start = max(1, len(c.saved_clocks))  # the workers training at the checkpoint, not train.workers
    c.members.incarnations = {w: i for w, i in st["incarnations"]}
    c.schedule.load_state(st["schedule"])
    c.stats = Stats.from_state(st["stats"])
    m = c.members
    m.deaths, m.restarts, m.stale_pushes = st["deaths"], st["worker_restarts"], st["stale_pushes"]
    m.quarantined = list(st["quarantined"])
    c.elapsed_before_s = st["elapsed_s"]
    c.logged_step = c.checkpointed_step = c.evaluated_step = st["step"]
    c.checkpointed_version = st["version"]
    c.last_loss = st["loss"]
    c.guard.load(st.get("guard"))
    c.resumed = True
