"""Command line: annotation rounds on a folder of your own images.

    python -m jaxal.query --pool photos/ --labels labels.csv --strategy ent_gn --budget 100 --workdir al/

The pool is every image file under --pool (a folder or a .tar/.tar.gz), named by its path relative to
it -- or, when the folder holds MRC files (.mrc, .rec, .map), every MRC volume under it (cryo-ET
subtomograms, read and normalised per volume by `jaxal.data.volumes`; the contact sheet shows each proposed
volume's central xy, xz and yz slices; the model defaults to AITom's DSRF3D-v2, `dsrf3d`); --labels is a CSV of `path,label` rows (a header row `path,label` is optional) with the labels you
have. Each run reads the labels, and if some are new since the last round (or there is no round yet)
trains the model on every labelled image, scores the others with the strategy and writes the --budget
best into `<workdir>/round_NNN/to_label.csv` (path, score, rank: best first) with a contact sheet of them,
`contact_sheet.png`. Label them (all, some, or other images too), append the rows to labels.csv (or pass
them in another file with --new-labels), and run the same command again for the next round. A run with
no new labels shows the last round's batch again, without training.

Every flag of `python -m jaxal.run` is here too (--epochs, --model, --gradnorm.norm, ...), from the
"annotation" preset (no labels held out); --budget is the number of images proposed per round. Classes:
--classes a,b,c, or the distinct labels of the first round (fixed from then on).

With Label Studio instead of a folder and a CSV (the key from $LABEL_STUDIO_API_KEY):

    python -m jaxal.query --label-studio http://localhost:8080 --project 1 --strategy ent_gn --budget 100 --workdir al/

reads the project's annotations and images and writes the round's predictions back into it, their
scores ordering its task list (`jaxal.labelstudio`); `python -m jaxal.serve` is the ML-backend form.

Boxes: `--task detection` (with a detection preset, e.g. `--preset bccd_fcos --strategy random`) takes
--labels as a COCO instances JSON or a PASCAL VOC folder, what annotation tools export, and draws the
detector's boxes on the contact sheet (`jaxal.detection.rounds`).

Bad input -- a label for a file that is not in the pool, a class outside the known set, a second label
that differs from an earlier one, a pool that changed under a round (files added or removed with no new
label to start a new round, or labelled files removed), other settings than the workdir's rounds -- ends
with a message and exit status 2, and writes nothing. A run killed during a round resumes it when
started again (from the scoring, if the training had finished); Ctrl-C says so and exits with 130.
One command at a time per workdir: a second one is refused naming the first's pid (`jaxal.workdir`).
A labels CSV is read as UTF-8 (with or without a byte-order mark) unless --labels-encoding names another
encoding; its paths match the pool's file names whatever their Unicode normalisation (NFC or NFD).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import posixpath
import sys
import unicodedata
from pathlib import Path

from jaxal import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.config_parser(
        "python -m jaxal.query",
        "Propose the next images to label from a folder of images and the labels you have (one annotation "
        "round per run; see the module docstring of jaxal.query).", default_preset="annotation",
        epilog="--budget is the number of images proposed per round; --dataset, --initial_size, --cycles and "
               "--trials do not apply here.")
    group = parser.add_argument_group("annotation")
    group.add_argument("--pool", help="folder (or .tar/.tar.gz) holding every image, labelled or not")
    group.add_argument("--labels", help="CSV of path,label rows: the labels you have (--task detection: a COCO instances JSON or a VOC "
                            "folder of boxes)")
    group.add_argument("--new-labels", "--new_labels", dest="new_labels", action="append", default=[],
                       help="more path,label rows in another CSV (may be given several times)")
    group.add_argument("--classes", help="every class, comma-separated; without it, the distinct labels of the first round")
    group.add_argument("--labels-encoding", "--labels_encoding", dest="labels_encoding", default="utf-8-sig",
                       help="text encoding of the labels CSV files (e.g. cp1252, latin-1); the default reads UTF-8, "
                            "with or without a byte-order mark")
    studio = parser.add_argument_group("Label Studio (instead of --pool and --labels; the key from $LABEL_STUDIO_API_KEY)")
    studio.add_argument("--label-studio", "--label_studio", dest="label_studio", metavar="URL",
                        help="the Label Studio server, e.g. http://localhost:8080: its project is the pool and its "
                             "annotations the labels; the round's predictions go back into it")
    studio.add_argument("--project", type=int, help="the Label Studio project id (in its URL: /projects/ID)")
    studio.add_argument("--from-name", "--from_name", dest="from_name",
                        help="the <Choices> tag to learn, when the label config has several")
    return parser


def read_label_rows(path: str, encoding: str = "utf-8-sig") -> list[tuple[str, str]]:
    """(path, label) rows of a labels CSV; a first row `path,label` is a header. ValueError names the
    file and row of anything malformed, and the line and byte of text that is not in `encoding`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the labels file {path}: {error.strerror or error}") from None
    try:
        text = data.decode(encoding)
    except LookupError:
        raise ValueError(f"--labels-encoding: unknown encoding {encoding!r} (e.g. utf-8, cp1252, latin-1)") from None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}, line {line}: byte 0x{data[error.start]:02x} (byte {column} of the line) is not "
                         f"valid {error.encoding}; save the file as UTF-8, or name its encoding with "
                         "--labels-encoding (e.g. cp1252 or latin-1 for Western European text)") from None
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{path}, row {number}: expected path,label, got {','.join(row)!r}")
        item, label = row[0].strip(), row[1].strip()
        if number == 1 and (item.lower(), label.lower()) == ("path", "label"):
            continue
        rows.append((item, label))
    return rows


def pool_relative(item: str, root: Path) -> str:
    """A labels-file path as the pool names it: relative to the pool root, POSIX separators, no "./"."""
    path = item.replace("\\", "/")
    if Path(path).is_absolute():
        try:
            path = Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{item} is not inside the pool {root}") from None
    return posixpath.normpath(path)


def as_pool_names(rows: list[tuple[str, str]], ids: list[str]) -> list[tuple[str, str]]:
    """`rows` with each path spelt as the pool spells it where they differ in Unicode normalisation only
    (macOS writes file names decomposed, NFD; most editors write labels composed, NFC)."""
    present = set(ids)
    composed: dict[str, list[str]] = {}
    for item in ids:
        composed.setdefault(unicodedata.normalize("NFC", item), []).append(item)
    out = []
    for item, label in rows:
        spellings = composed.get(unicodedata.normalize("NFC", item), [])
        out.append((spellings[0] if item not in present and len(spellings) == 1 else item, label))
    return out


def folder_round(config, args: argparse.Namespace, log=print) -> None:
    from jaxal import folders, parallel, workdir as workdir_lock

    if config.task == "detection":  # boxes: `jaxal.detection.rounds`
        from jaxal.detection import rounds

        if args.new_labels:
            raise ValueError("--task detection reads every label from --labels (a COCO JSON or a VOC folder, as the "
                             "annotation tool exports it); --new-labels is for path,label CSV files")
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        return rounds.detection_round(config, args.pool, args.labels, classes, log)
    from jaxal.data import volumes

    root = Path(args.pool)
    is_volumes = root.is_dir() and bool(volumes.list_volumes(root))  # MRC files: a pool of subtomograms
    ids = volumes.list_volumes(root) if is_volumes else folders.list_images(root)
    rows = as_pool_names([(pool_relative(item, root), label) for path in [args.labels, *args.new_labels]
                          for item, label in read_label_rows(path, args.labels_encoding)], ids)
    workdir = Path(config.workdir or "al")
    with workdir_lock.hold(workdir, parallel.is_primary()):
        propose_round(config, args, root, ids, rows, workdir, log, is_volumes)


def propose_round(config, args: argparse.Namespace, root: Path, ids: list, rows: list, workdir: Path, log,
                  is_volumes: bool = False) -> None:
    """One round (or the last one's batch again), holding the workdir's lock; writes the round's files."""
    from jaxal import folders, parallel, results
    from jaxal.data import volumes
    from jaxal.learner import ActiveLearner, round_folder

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    learner = ActiveLearner(classes=classes, workdir=workdir, config=config, log=log)
    learner.tell([item for item, _ in rows], [label for _, label in rows])
    if is_volumes:
        if config.image_size is not None:
            raise ValueError("--image_size resizes 2-D images; the pool holds MRC volumes (resample them before)")
        images = volumes.read_volumes([root / item for item in ids], cache_dir=None)[0]
    else:
        images = folders.read_images(root, ids, image_size=config.image_size)
    proposal = learner.ask(ids, images, k=config.budget)

    folder = workdir / round_folder(proposal.round)
    if parallel.is_primary():
        folder.mkdir(parents=True, exist_ok=True)
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["path", "score", "rank"])
        writer.writerows([item, "" if score is None else repr(score), rank] for item, score, rank in proposal.rows())
        results.write_atomic(folder / "to_label.csv", table.getvalue())
        index = {item: row for row, item in enumerate(ids)}
        chosen = images[[index[item] for item in proposal.ids]]
        if is_volumes:  # a volume is shown by its central xy, xz and yz slices, side by side
            chosen = volumes.central_slices(chosen)
        captions = [f"{rank}: {Path(item).name}" for item, _, rank in proposal.rows()]
        results.write_atomic(folder / "contact_sheet.png", results.contact_sheet(chosen, captions))
        log(f"round {proposal.round}: label the {len(proposal)} images in {folder / 'to_label.csv'} "
            f"(best first; contact sheet: {folder / 'contact_sheet.png'}),\nadd them to {args.labels} as "
            "path,label rows (or put them in a file for --new-labels) and run this command again for the next round")
        log(json.dumps({"round": proposal.round, "to_label": str(folder / "to_label.csv"),
                        "contact_sheet": str(folder / "contact_sheet.png"), "retrained": proposal.retrained}))


def run_label_studio_round(config, args: argparse.Namespace, log=print) -> None:
    from jaxal import labelstudio, parallel, workdir as workdir_lock

    client = labelstudio.Client(args.label_studio, labelstudio.api_key())
    with workdir_lock.hold(Path(config.workdir or "al"), parallel.is_primary()):
        labelstudio.project_round(client, args.project, config, from_name=args.from_name, log=log)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label_studio is not None:
        if args.project is None or args.pool or args.labels or args.new_labels or args.classes:
            parser.error("--label-studio takes --project (and --from-name), not --pool/--labels/--new-labels/--classes: "
                         "the project holds the images, the annotations and the classes")
        return cli.run_command(args, lambda config: run_label_studio_round(config, args))
    if not args.pool or not args.labels:
        parser.error("give --pool and --labels (or --label-studio and --project)")
    return cli.run_command(args, lambda config: folder_round(config, args))


if __name__ == "__main__":
    sys.exit(main())
