"""Oxford-IIIT Pet in its original layout.

    root/images/<name>.jpg                  (opened by content: the archive holds a GIF and PNGs named .jpg)
    root/annotations/trimaps/<name>.png     (1 = pet, 2 = background, 3 = border / not classified)
    root/annotations/{trainval,test,list}.txt   lines "<name> <class_id> <species> <breed_id>", '#' = comment

Splits: "trainval" and "test" (the official lists; "train" is an alias of "trainval"), and "all": every
image in images/, labelled from the list files when listed, else from its file name (breed = the name
without its trailing _<number>; a capitalised name is a cat). Images not in a list are only in "all".

Label modes (classes, index 0 = background):
- binary:  background, pet
- species: background, cat, dog                          (species 1 = cat, 2 = dog)
- breeds:  background + the breeds named in the list files present, sorted by class_id. The full dataset
  gives the 37 breeds; a subset gives only its breeds (class ids need not be contiguous: 3 breeds with
  class_ids 1, 2, 6 give 4 classes). Trainval and test share this class list.

Masks: trimap 1 -> the image's class, 2 -> background (0), 3 -> `trimap_border`: "ignore" (255, default),
"pet" (the image's class) or "background" (0). Other trimap values are an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakseg.config import ConfigError, DataCfg
from weakseg.data.base import DataError
from weakseg.data.files import (
    IGNORE, FileDataset, ProblemLog, Sample, allowed_roots, escapes, multi_hot, unsafe_name_reason,
)
from weakseg.data.imageio import list_images

PET_LABEL_MODES = ("binary", "species", "breeds")
TRIMAP_BORDER_MODES = ("ignore", "pet", "background")
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
SPECIES_NAMES = {1: "cat", 2: "dog"}
PET_LIST_FILES = ("trainval", "test", "list")
PET_SPLITS = ("trainval", "test", "all")
PET_SPLIT_ALIASES = {"train": "trainval"}


@dataclass(frozen=True)
class PetListEntry:
    """One line of a Pet list file."""

    name: str
    class_id: int  # 1..37
    species: int  # 1 = cat, 2 = dog
    breed_id: int  # 1..25 cats, 1..12 dogs
    file: Path
    line: int


def breed_from_name(name: str) -> str:
    """"american_bulldog_12" -> "american_bulldog"."""
    return name.rsplit("_", 1)[0]


def species_from_name(name: str) -> int:
    """Pet naming rule: capitalised file names are cats (1), lower-case ones dogs (2)."""
    return 1 if name[:1].isupper() else 2


def read_pet_list(path: Path, log: ProblemLog) -> list[PetListEntry]:
    """Parse a Pet list file; malformed lines and duplicate names are reported to `log` and dropped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({e})", file=path) from e
    entries: list[PetListEntry] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        tokens = stripped.split()
        try:
            if len(tokens) != 4:
                raise ValueError
            class_id, species, breed_id = (int(t) for t in tokens[1:])
        except ValueError:
            log.add(tokens[0], path, f"line {lineno}: expected '<name> <class_id> <species> <breed_id>', "
                                     f"got {stripped!r}")
            continue
        name = tokens[0]
        if species not in SPECIES_NAMES or class_id < 1:
            log.add(name, path, f"line {lineno}: species must be 1 (cat) or 2 (dog) and class_id >= 1, "
                                f"got {stripped!r}")
            continue
        if name in first_line:
            log.add(name, path, f"line {lineno}: duplicate id {name!r} (first on line {first_line[name]})")
            continue
        first_line[name] = lineno
        entries.append(PetListEntry(name, class_id, species, breed_id, path, lineno))
    return entries


def breed_catalogue(entries: list[PetListEntry]) -> dict[int, tuple[str, int]]:
    """class_id -> (breed name, species) from list entries; inconsistent lists are a DataError."""
    catalogue: dict[int, tuple[str, int]] = {}
    origin: dict[int, PetListEntry] = {}
    for e in entries:
        value = (breed_from_name(e.name), e.species)
        known = catalogue.setdefault(e.class_id, value)
        origin.setdefault(e.class_id, e)
        if known != value:
            o = origin[e.class_id]
            raise DataError(f"{e.file}: line {e.line}: class_id {e.class_id} is breed {value[0]!r} species "
                            f"{value[1]}, but {o.file} line {o.line} gives {known[0]!r} species {known[1]}",
                            file=e.file)
    return catalogue


class PetDataset(FileDataset):
    """Oxford-IIIT Pet; labels (C-1,) float32 per label mode, masks from trimaps (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "trainval", label_mode: str = "binary",
                 trimap_border: str = "ignore", on_error: str = "raise"):
        if label_mode not in PET_LABEL_MODES:
            raise ConfigError(f"data.label_mode for pet must be one of {', '.join(PET_LABEL_MODES)}, "
                              f"got {label_mode!r}")
        if trimap_border not in TRIMAP_BORDER_MODES:
            raise ConfigError(f"data.trimap_border must be one of {', '.join(TRIMAP_BORDER_MODES)}, "
                              f"got {trimap_border!r}")
        root = Path(root)
        canonical = PET_SPLIT_ALIASES.get(split, split)
        if canonical not in PET_SPLITS:
            raise DataError(f"{root}: pet has splits {', '.join(PET_SPLITS)} (and 'train' = trainval), "
                            f"not {split!r}", file=root)
        images_dir, trimaps_dir = root / "images", root / "annotations" / "trimaps"
        for folder in (images_dir, trimaps_dir):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder not found (expected the Oxford-IIIT Pet layout "
                                "images/, annotations/trimaps/)", file=folder)
        self.label_mode, self.trimap_border = label_mode, trimap_border
        log = ProblemLog(on_error)

        lists = {n: root / "annotations" / f"{n}.txt" for n in PET_LIST_FILES}
        if canonical != "all" and not lists[canonical].is_file():
            raise DataError(f"{lists[canonical]}: list file not found (split {split!r})", file=lists[canonical])
        # Classes come from every list present, so trainval and test agree. Only the split's own list
        # reports its line problems; the others are read quietly for the catalogue.
        parsed: dict[str, list[PetListEntry]] = {}
        for n, path in lists.items():
            if path.is_file():
                parsed[n] = read_pet_list(path, log if n == canonical else ProblemLog("skip"))
        if "trainval" in parsed and "test" in parsed:
            overlap = sorted({e.name for e in parsed["trainval"]} & {e.name for e in parsed["test"]})
            if overlap:
                raise DataError(f"{lists['test']}: {len(overlap)} image(s) are also in {lists['trainval']} "
                                f"(e.g. {overlap[:3]}); the official splits are disjoint", file=lists["test"])
        catalogue = breed_catalogue([e for entries in parsed.values() for e in entries])
        self.breed_class_ids = sorted(catalogue)
        if label_mode == "binary":
            class_names = ["background", "pet"]
        elif label_mode == "species":
            class_names = ["background", "cat", "dog"]
        else:
            if not catalogue:
                raise DataError(f"{root / 'annotations'}: label_mode=breeds needs a list file "
                                f"({', '.join(f'{n}.txt' for n in PET_LIST_FILES)}) naming the breeds", file=root)
            class_names = ["background"] + [catalogue[c][0] for c in self.breed_class_ids]
        breed_index = {cid: k + 1 for k, cid in enumerate(self.breed_class_ids)}
        class_of_breed = {catalogue[c][0]: c for c in catalogue}

        if canonical == "all":
            listed = {e.name: e for entries in parsed.values() for e in entries}
            names = [p.stem for p in list_images(images_dir) if p.suffix.lower() == ".jpg"]
        else:
            listed = {e.name: e for e in parsed[canonical]}
            names = list(listed)

        allowed = allowed_roots(root, images_dir, trimaps_dir)
        samples: list[Sample] = []
        self.foreground: list[int] = []  # class id of the pet in each sample's mask
        self.unlisted: list[str] = []  # "all" split: images in no list file, labelled from their file names
        where = lists[canonical] if canonical != "all" else images_dir
        for name in names:
            reason = unsafe_name_reason(name)
            if reason:
                log.add(name, where, reason)
                continue
            image, trimap = images_dir / f"{name}.jpg", trimaps_dir / f"{name}.png"
            problem = None
            for path, kind in ((image, "image"), (trimap, "trimap")):
                reason = escapes(path, allowed)
                if reason:
                    problem = (path, f"{kind} {reason}")
                elif not path.is_file():
                    problem = (path, f"{kind} missing for id {name!r} listed in {where}")
                if problem:
                    break
            if problem:
                log.add(name, *problem)
                continue
            entry = listed.get(name)
            if entry is not None:
                class_id, species = entry.class_id, entry.species
            else:  # "all" split, image not in any list: label from the file name
                self.unlisted.append(name)
                species = species_from_name(name)
                class_id = class_of_breed.get(breed_from_name(name), 0)
                if label_mode == "breeds" and not class_id:
                    log.add(name, image, f"breed {breed_from_name(name)!r} (from the file name) is not in the "
                                         "list files, so it has no class")
                    continue
            if label_mode == "binary":
                fg = 1
            elif label_mode == "species":
                fg = species
            else:
                fg = breed_index[class_id]
            samples.append(Sample(name, image, multi_hot([fg], len(class_names) - 1), trimap))
            self.foreground.append(fg)
        super().__init__(class_names, samples, log.items, root, split, str(where))

    def convert_mask(self, raw: np.ndarray, i: int) -> np.ndarray:
        """Trimap (H, W) with values 1/2/3 -> class ids per `trimap_border`."""
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        bad = [int(v) for v in present if v not in (TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER)]
        if bad:
            path = self.samples[i].mask
            raise DataError(f"{path}: trimap values {bad} are outside 1 (pet), 2 (background), 3 (border)",
                            file=path)
        fg = self.foreground[i]
        border = {"ignore": IGNORE, "pet": fg, "background": 0}[self.trimap_border]
        lut = np.zeros(256, dtype=np.uint8)
        lut[TRIMAP_PET], lut[TRIMAP_BACKGROUND], lut[TRIMAP_BORDER] = fg, 0, border
        return lut[raw]

    def describe(self) -> dict:
        info = super().describe()
        info.update(label_mode=self.label_mode, trimap_border=self.trimap_border, unlisted=list(self.unlisted))
        return info


def build_pet(cfg: DataCfg, split: str) -> PetDataset:
    return PetDataset(cfg.root, split, cfg.label_mode, cfg.trimap_border, cfg.on_error)
