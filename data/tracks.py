"""The benchmark's tracks, in one place: `run.sh` runs a track's record command, `train.py` logs which track a run
qualifies for, and `python -m tools.records check` holds a record to its track's constants.

    python data/tracks.py                # the table
    python data/tracks.py sp2014         # one track as shell assignments (what run.sh reads)

A track fixes the data (its fingerprint: the `data sha256` train.py logs), the target validation loss in the frozen
metric, --max_len, the evaluation cadence and the hardware class. The record command is today's best configuration;
a new record may change anything in it but those constants.
"""
import shlex
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Track:
    name: str
    data: str                 # where run.sh keeps the shards
    build: str                # the command that makes them from public sources, given --out DIR
    fingerprint: str | None   # the shards' `data sha256`; None: not pinned yet (no run with hub access so far)
    target: float | None      # frozen-metric validation loss a record must beat; None: pending
    max_len: int
    val_every: int            # steps between evaluations of a record run
    gpus: int                 # the hardware class: this many GPUs of one host, ...
    gpu_models: tuple         # ... each with one of these in its name
    global_batch: int         # tokens per optimizer step, split over the GPUs by run.sh
    record: str               # the record's train.py flags besides the batch split
    about: str


SP2014_FINGERPRINT = "fe9e012bdcf9f91e5a8f3a843869393941470c6102dc1c7d3169057cac85eaf2"
TRACKS = {t.name: t for t in [
    Track("sp2014", "data/sp2014", "python data/sp2014.py", SP2014_FINGERPRINT, 2.78, 1024, 140,
          1, ("H100",), 65536,
          "--preset sprint --max_steps 700 --val_every 140 --target_val_loss 2.78",
          "Swiss-Prot 2014 split by 50%-identity clusters; early learning (20 s of training)"),
    Track("sp2014-long", "data/sp2014", "python data/sp2014.py", SP2014_FINGERPRINT, 2.61, 1024,
          1870, 1, ("H100", "H200"), 65536,
          "--preset sprint --max_steps 14960 --val_every 1870 --target_val_loss 2.61 --sample_by_cluster "
          "--log_every 100 --mask_rate 0.25 --muon_weight_decay 0.005 --normuon",
          "the sp2014 data to a useful model: 2.61, 0.29 nats under the letter-frequency baseline"),
    Track("omgprot50", "data/omgprot50", "python data/download_omgprot50.py", None, None, 1024,
          100, 8, ("H100", "H200"), 524288,
          "--preset speedrun --max_steps 1000 --val_every 100",
          "the official OMGprot50 benchmark; target: ESM2-150M's frozen-metric score (pending: "
          "python -m tools.hf score on a local copy of facebook/esm2_t30_150M_UR50D, README.md says how)"),
]}
DEFAULT = "sp2014"


def track_problems(track: Track, data_sha256: str, hyperparameters: dict, world_size: int, gpu_names: list) -> list:
    """Why a run does not count on `track` (empty if it does)."""
    h, p = hyperparameters, []
    if track.fingerprint is None or track.target is None:
        p.append(f"track {track.name} has no pinned data fingerprint or target yet")
    elif data_sha256 != track.fingerprint:
        p.append(f"its data (sha256 {data_sha256[:12]}...) are not track {track.name}'s ({track.fingerprint[:12]}...)")
    if track.target is not None and h["target_val_loss"] != track.target:
        p.append(f"--target_val_loss is {h['target_val_loss']}, the track's target is {track.target}")
    for name in ("max_len", "val_every"):
        if h[name] != getattr(track, name):
            p.append(f"--{name} is {h[name]}, the track's is {getattr(track, name)}")
    if world_size != track.gpus or len(gpu_names) != track.gpus or not all(
            any(m in g for m in track.gpu_models) for g in gpu_names):
        p.append(f"it ran on {world_size} rank(s) of {', '.join(gpu_names) or 'no GPU'}; the track's hardware is "
                 f"{track.gpus} GPU(s), each an {' or '.join(track.gpu_models)}")
    return p


def track_of(data_sha256: str, hyperparameters: dict, tracks: dict = TRACKS) -> Track | None:
    """The track a run's data and target name, whether or not it meets the rest of the track's constants."""
    return next((t for t in tracks.values() if t.fingerprint == data_sha256
                 and t.target == hyperparameters["target_val_loss"]), None)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        for t in TRACKS.values():
            print(f"{t.name:12s} target {t.target or 'pending'} | {t.gpus}x {'/'.join(t.gpu_models)} | {t.about}")
    elif sys.argv[1] in TRACKS:
        for key, value in asdict(TRACKS[sys.argv[1]]).items():
            value = " ".join(value) if isinstance(value, tuple) else "" if value is None else value
            print(f"TRACK_{key.upper()}={shlex.quote(str(value))}")
    else:
        sys.exit(f"tracks.py: no track {sys.argv[1]!r}; the tracks are {', '.join(TRACKS)}")
