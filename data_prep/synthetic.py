"""A synthetic WeatherQA-like dataset (Gemini JSON + GIFs) whose texts depend on the images.

Every case draws latent "weather" factors: the region of the main feature (NW/NE/SW/SE), its
strength (weak/moderate/strong) and the main threat (tornado/hail/wind). Every element image is
one `cond_name` field, drawn with that type's own colour map and background stripes, plus a blob
whose position encodes the region, whose brightness encodes the element's strength (the case's,
sometimes one level off) and whose size encodes its extent (compact/broad). The texts are built
from the same factors:

- caption (4 sentences): S1-S2 describe the blob (region, strength, extent), S3 the physical
  meaning of that strength of that parameter, S4 links it to the case summary (threat, watch
  probability, area);
- global_summary: an SPC Mesoscale Discussion ("Areas affected...", "Concerning...",
  "Probability of Watch Issuance...NN percent", "SUMMARY...", "DISCUSSION...") whose area,
  concern, probability and numbers follow the case factors; 1-5 discussion paragraphs give
  realistic, varied lengths (many over 256 tokens).

So a model can only caption well, or summarise well, by reading the image prefix: that is what
the tests and the image ablation measure. The factors are also stored in the JSON as extra
`synthetic_factors` fields (loaders ignore them).

Layout (the real one): `<out>/md_image/<year>/<param>/md<serial>_<yyyymmdd>_<hh>_<param>.gif`,
with `rgnlrad_cropped/` and `bigsfc_cropped/` folders for those two types; JSON files
`<out>/gemini_element_captions_<years>.json` (the last file holds 2020, like the real test file).
The first file's `image_rel_path`s start at `md_image/`; later files carry a foreign prefix
(`kse/ClimateToText/data/WeatherQA/md_image/...`), as paths written on another machine do. About
one image in six is a 2-frame GIF (the blob moves east in frame 1).

`corrupt={"missing_image": 2, ...}` injects problems deterministically (without changing any
clean case) and writes `<out>/injected_faults.json` saying what was injected where and which
skip reason it must produce. Kinds: see FAULT_KINDS.

    python -m data_prep.synthetic --out /tmp/wqa --num-cases 40 --num-files 2 --seed 0
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.cli import cli_main
from common.config import parse_config, print_config
from common.io import atomic_write_json
from models.cond_names import COND_DESCRIPTIONS, COND_NAMES

YEARS: tuple[int, ...] = tuple(range(2014, 2021))
TEST_YEAR = 2020
REGIONS: tuple[str, ...] = ("NW", "NE", "SW", "SE")
STRENGTHS: tuple[str, ...] = ("weak", "moderate", "strong")
EXTENTS: tuple[str, ...] = ("compact", "broad")
THREATS: tuple[str, ...] = ("tornado", "hail", "wind")
FOLDERS = {"rgnlrad": "rgnlrad_cropped", "bigsfc": "bigsfc_cropped"}
FOREIGN_PREFIX = "kse/ClimateToText/data/WeatherQA/"
MULTI_FRAME_PROB = 1 / 6

# kind -> (field, reason) of the skip that load_gemini_json (JSON faults) or the shard builder
# (image faults: ImageDecodeError.reason, recorded under the element's image_rel_path) reports.
FAULT_KINDS: dict[str, tuple[str, str]] = {
    "missing_image": ("image_rel_path", "missing"),
    "empty_file": ("image_rel_path", "empty"),
    "corrupt_gif": ("image_rel_path", "corrupt"),
    "not_an_image": ("image_rel_path", "not_an_image"),
    "bad_cond_name": ("cond_name", "unknown_cond_name"),
    "missing_caption": ("caption", "missing"),
    "empty_summary": ("global_summary", "empty"),
}
CASE_FAULTS = frozenset({"empty_summary"})

# ----------------------------------------------------------------------------------------------
# Factors


@dataclass
class CaseFactors:
    region: str
    strength: str
    threat: str
    year: int
    serial: int
    month: int
    day: int
    hour: int
    probability: int

    @property
    def date(self) -> str:
        return f"{self.year:04d}{self.month:02d}{self.day:02d}"

    @property
    def stem(self) -> str:
        return f"md{self.serial:04d}_{self.date}_{self.hour:02d}"


@dataclass
class ElementFactors:
    cond_name: str
    strength: str
    extent: str
    frames: int


PROBABILITIES = {"weak": (5, 20), "moderate": (40, 60), "strong": (80, 95)}


def _draw_case(rng: np.random.Generator, year: int, serial: int) -> CaseFactors:
    strength = STRENGTHS[rng.integers(3)]
    return CaseFactors(region=REGIONS[rng.integers(4)], strength=strength, threat=THREATS[rng.integers(3)],
                       year=year, serial=serial, month=int(rng.integers(4, 8)), day=int(rng.integers(1, 29)),
                       hour=int(rng.choice([0, 3, 18, 19, 20, 21, 22, 23])),
                       probability=int(rng.choice(PROBABILITIES[strength])))


def _draw_element(rng: np.random.Generator, case: CaseFactors, cond_name: str) -> ElementFactors:
    level = STRENGTHS.index(case.strength)
    if rng.random() < 0.2:  # one level off now and then: captions must read *this* image
        level = int(np.clip(level + rng.choice([-1, 1]), 0, 2))
    return ElementFactors(cond_name, STRENGTHS[level], EXTENTS[rng.integers(2)],
                          2 if rng.random() < MULTI_FRAME_PROB else 1)


# ----------------------------------------------------------------------------------------------
# Images

AMPLITUDE = {"weak": 0.35, "moderate": 0.62, "strong": 0.92}
SIGMA = {"compact": 0.08, "broad": 0.15}  # blob std as a fraction of the image side
REGION_CENTRE = {"NW": (0.3, 0.3), "NE": (0.7, 0.3), "SW": (0.3, 0.7), "SE": (0.7, 0.7)}  # (x, y)


@lru_cache(maxsize=None)
def _palette(cond_name: str) -> bytes:
    """A 256-entry colour map of its own per type: dark/grey at 0 to a saturated hue at 1."""
    hue = (COND_NAMES.index(cond_name) * 7 % 20) / 20
    lut = [colorsys.hsv_to_rgb((hue + 0.12 * v) % 1.0, 0.25 + 0.7 * v, 0.12 + 0.88 * v)
           for v in np.linspace(0.0, 1.0, 256)]
    return bytes(int(round(255 * c)) for rgb in lut for c in rgb)


@lru_cache(maxsize=None)
def _background(cond_name: str, px: int) -> np.ndarray:
    """Type-specific stripes (angle and frequency per type): what a classifier can key on."""
    idx = COND_NAMES.index(cond_name)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    angle = np.pi * idx / len(COND_NAMES)
    freq = 2 + idx % 3
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    return 0.16 + 0.06 * stripes


def _field(rng: np.random.Generator, case: CaseFactors, el: ElementFactors, px: int,
           offset: tuple[float, float]) -> np.ndarray:
    cx, cy = REGION_CENTRE[case.region]
    cx, cy = (cx + offset[0]) * px, (cy + offset[1]) * px
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
    sigma = SIGMA[el.extent] * px
    blob = AMPLITUDE[el.strength] * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    noise = 0.02 * rng.standard_normal((px, px)).astype(np.float32)
    return np.clip(_background(el.cond_name, px) + blob + noise, 0.0, 1.0)


def _to_palette_image(values: np.ndarray, cond_name: str) -> Image.Image:
    img = Image.fromarray(np.round(values * 255).astype(np.uint8), mode="P")
    img.putpalette(_palette(cond_name))
    return img


def render_gif(rng: np.random.Generator, case: CaseFactors, el: ElementFactors, px: int) -> bytes:
    """The element's palette GIF; frame 1 (if any) has the blob moved east."""
    # Jitter the centre a little so images of one factor setting are not identical.
    dx, dy = rng.uniform(-0.05, 0.05, size=2)
    frames = [_to_palette_image(_field(rng, case, el, px, (dx + 0.1 * i, dy)), el.cond_name)
              for i in range(el.frames)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=el.frames > 1, append_images=frames[1:], duration=500, loop=0)
    return buf.getvalue()


def random_gif(rng: np.random.Generator, px: int = 64) -> tuple[bytes, dict[str, int]]:
    """One image of random factors and those factors as indices: {"region": into REGIONS, "strength":
    into STRENGTHS, "extent": into EXTENTS} -- what the texts say about an image. E.g. to pre-train
    tiny Stage1 models, which stand in for a real encoder whose latent describes the image."""
    case = _draw_case(rng, 2020, 1)
    el = _draw_element(rng, case, COND_NAMES[int(rng.integers(len(COND_NAMES)))])
    factors = {"region": REGIONS.index(case.region), "strength": STRENGTHS.index(el.strength),
               "extent": EXTENTS.index(el.extent)}
    return render_gif(rng, case, el, px), factors


def image_rel_path(case: CaseFactors, cond_name: str) -> str:
    folder = FOLDERS.get(cond_name, cond_name)
    return f"md_image/{case.year}/{folder}/{case.stem}_{cond_name}.gif"


# ----------------------------------------------------------------------------------------------
# Texts

REGION_WORDS = {"NW": "northwest", "NE": "northeast", "SW": "southwest", "SE": "southeast"}
REGION_STATES = {
    "NW": ["central MT", "western ND", "northern WY", "western SD", "eastern ID", "northwest MN"],
    "NE": ["southeast OH", "northern WV", "western PA", "southern NY", "western MD", "northern VA"],
    "SW": ["the TX Panhandle", "western OK", "eastern NM", "southwest KS", "west TX", "the OK Panhandle"],
    "SE": ["central AL", "northern GA", "eastern MS", "the FL Panhandle", "southern SC", "eastern TN"],
}
TIME_ZONE = {"NW": ("MDT", 6), "NE": ("EDT", 4), "SW": ("CDT", 5), "SE": ("EDT", 4)}
CONDITION_ROLE = {
    "shr6": "organized, rotating updrafts", "scp": "supercell development", "tadv": "large-scale ascent",
    "lclh": "tornadoes beneath low cloud bases", "epvl": "banded, elevated convection",
    "laps": "large hail from steep mid-level lapse rates", "mcsm": "a long-lived convective system",
    "rgnlrad": "ongoing and expanding thunderstorms", "mcon": "convective initiation along the boundary",
    "ttd": "a moist, unstable boundary layer", "thea": "destabilization from theta-e advection",
    "swbt": "strong evaporative cooling in downdrafts", "stor": "significant tornadoes",
    "lllr": "damaging gusts from a well-mixed boundary layer", "srh1": "low-level mesocyclones",
    "bigsfc": "storms along the surface front", "effh": "updraft rotation in the effective inflow layer",
    "sbcp": "vigorous surface-based updrafts", "fzlv": "hail reaching the ground",
    "pchg": "a deepening surface low and backed winds",
}
STRENGTH_SUPPORT = {"weak": ["offers only marginal support for", "does little to favor",
                             "provides limited support for"],
                    "moderate": ["provides some support for", "moderately favors", "supports"],
                    "strong": ["strongly favors", "is very supportive of", "points to a high potential for"]}
STRENGTH_LOOK = {"weak": ["a weak", "a faint", "a subdued"],
                 "moderate": ["a moderate", "a well-defined", "a distinct"],
                 "strong": ["a strong", "an intense", "a pronounced"]}
INTENSITY = {"weak": ["only slightly brighter than the background", "barely above the background values"],
             "moderate": ["clearly brighter than its surroundings", "noticeably elevated above the background"],
             "strong": ["the brightest shading on the map", "far above the background values"]}
EXTENT_LOOK = {"compact": ["compact and sharply defined", "small and tightly focused"],
               "broad": ["broad and spread over a large area", "expansive and covers much of its quadrant"]}
THREAT_WORDS = {"tornado": "a few tornadoes and damaging winds", "hail": "large hail up to 2 inches in diameter",
                "wind": "damaging wind gusts"}
COVERAGE = {"weak": "Isolated", "moderate": "Scattered", "strong": "Numerous"}
WATCH_SENTENCE = {"weak": "A watch is not expected at this time.",
                  "moderate": "Trends are being monitored for a possible watch.",
                  "strong": "A watch will likely be needed within the next hour or two."}
CAPE = {"weak": (500, 1000), "moderate": (1500, 2500), "strong": (3000, 4500)}
SHEAR = {"weak": (20, 30), "moderate": (35, 45), "strong": (50, 65)}
SRH = {"weak": (50, 100), "moderate": (150, 250), "strong": (300, 500)}
DEWPOINTS = {"weak": "mid to upper 50s", "moderate": "lower to mid 60s", "strong": "upper 60s to lower 70s"}
FORECASTERS = ("Harper", "Nguyen", "Okafor", "Lindqvist", "Moreau", "Castillo")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _areas(rng: np.random.Generator, case: CaseFactors) -> list[str]:
    states = REGION_STATES[case.region]
    n = int(rng.integers(2, 5))
    return [states[i] for i in sorted(rng.choice(len(states), size=n, replace=False))]


def _concerning(case: CaseFactors) -> str:
    if case.strength == "weak":
        return "Severe potential...Watch unlikely"
    if case.strength == "moderate":
        return "Severe potential...Watch possible"
    kind = "Tornado Watch" if case.threat == "tornado" else "Severe Thunderstorm Watch"
    return f"Severe potential...{kind} likely"


def make_caption(rng: np.random.Generator, case: CaseFactors, el: ElementFactors, area: str) -> str:
    desc = COND_DESCRIPTIONS[el.cond_name]
    region = REGION_WORDS[case.region]
    look = _pick(rng, STRENGTH_LOOK[el.strength])
    s1 = _pick(rng, [f"The {desc} map shows {look} maximum centered over the {region} part of the domain.",
                     f"{look.capitalize()} core of {desc} stands out in the {region} quadrant of the map.",
                     f"The highest {desc} values form {look} area over the {region} portion of the image."])
    s2 = _pick(rng, [f"The feature is {_pick(rng, EXTENT_LOOK[el.extent])}, with shading "
                     f"{_pick(rng, INTENSITY[el.strength])}.",
                     f"Its footprint is {_pick(rng, EXTENT_LOOK[el.extent])}, and its core is "
                     f"{_pick(rng, INTENSITY[el.strength])}."])
    s3 = (f"This {el.strength} signal {_pick(rng, STRENGTH_SUPPORT[el.strength])} "
          f"{CONDITION_ROLE[el.cond_name]}.")
    s4 = _pick(rng, [f"This is consistent with the discussion's concern for {THREAT_WORDS[case.threat]} "
                     f"across {area}.",
                     f"It helps explain the {case.probability} percent watch probability for {area}.",
                     f"Together with the other fields, it supports the outlook for {THREAT_WORDS[case.threat]} "
                     f"near {area}."])
    return " ".join([s1, s2, s3, s4])


def _discussion_sentences(rng: np.random.Generator, case: CaseFactors, area: str) -> list[str]:
    s = case.strength
    cape = int(rng.integers(*CAPE[s]) // 250 * 250)
    shear = int(rng.integers(*SHEAR[s]) // 5 * 5)
    srh = int(rng.integers(*SRH[s]) // 25 * 25)
    region = REGION_WORDS[case.region]
    zone, offset = TIME_ZONE[case.region]
    hour_local = (case.hour - offset) % 24
    clock = f"{(hour_local - 1) % 12 + 1} {'am' if hour_local < 12 else 'pm'} {zone}"
    return [
        f"Latest objective analysis shows MLCAPE around {cape} J/kg across {area}, beneath mid-level "
        f"lapse rates of {6.0 + 0.8 * STRENGTHS.index(s):.1f}-{6.8 + 0.8 * STRENGTHS.index(s):.1f} C/km.",
        f"Effective bulk shear of {shear}-{shear + 10} kt is in place over the {region} part of the area.",
        f"Regional radar at {case.hour:02d}Z/{clock} shows {COVERAGE[s].lower()} cells developing near {area}.",
        f"Surface observations show dewpoints in the {DEWPOINTS[s]} F ahead of a slow-moving front, with "
        f"temperatures warming into the 80s F.",
        f"0-1 km storm-relative helicity near {srh} m2/s2 {'favors' if s != 'weak' else 'only marginally favors'} "
        f"low-level rotation in any discrete storms.",
        f"The primary threat will be {THREAT_WORDS[case.threat]}, especially with any storms that remain discrete.",
        f"Convective inhibition continues to erode as the boundary layer mixes through the afternoon.",
        f"Forecast soundings show {'modest' if s == 'weak' else 'favorable'} buoyancy through the hail growth zone.",
        f"Mid-level flow around {shear + 5} kt will carry storms east-northeast at 30-40 kt.",
        f"Storm coverage should {'remain limited' if s == 'weak' else 'increase'} through {(case.hour + 3) % 24:02d}Z.",
        f"Confidence in the overall evolution is {'low' if s == 'weak' else 'moderate' if s == 'moderate' else 'high'}.",
        f"Trends will be monitored closely across {area} over the next few hours.",
        f"Visible satellite imagery shows a {'shallow' if s == 'weak' else 'deepening'} cumulus field along the "
        f"{region}ern edge of the outlook area.",
        f"Low-level warm advection on a {20 + 10 * STRENGTHS.index(s)}-{30 + 10 * STRENGTHS.index(s)} kt "
        f"southerly jet will maintain moisture transport into {area}.",
        f"Any stronger updraft could produce {THREAT_WORDS[case.threat]}.",
        f"Recent runs of the HRRR {'struggle to maintain' if s == 'weak' else 'consistently develop'} "
        f"convection in this corridor through early evening.",
        f"A weak mid-level impulse, evident in water vapor imagery, is approaching from the west.",
        f"Storms may {'weaken quickly after sunset' if s == 'weak' else 'grow upscale into a line by evening'}.",
    ]


def make_summary(rng: np.random.Generator, case: CaseFactors, areas: list[str]) -> str:
    area_full = "...".join(areas)
    area_short = " and ".join(areas[:2])
    valid_from = f"{case.day:02d}{case.hour:02d}00Z"
    valid_to = f"{case.day + (case.hour + 3) // 24:02d}{(case.hour + 3) % 24:02d}00Z"
    summary = (f"{COVERAGE[case.strength]} thunderstorms may develop over the next few hours across "
               f"{area_short}, with {THREAT_WORDS[case.threat]} the main concern. {WATCH_SENTENCE[case.strength]}")
    pool = _discussion_sentences(rng, case, area_short)
    # 3-16 distinct sentences in paragraphs of 2-4: from short MDs to long ones (> 256 tokens).
    chosen = [pool[i] for i in rng.permutation(len(pool))[: int(rng.integers(3, 17))]]
    paragraphs = []
    while chosen:
        n = int(rng.integers(2, 5))
        paragraphs.append(" ".join(chosen[:n]))
        chosen = chosen[n:]
    discussion = "\n\n".join(paragraphs)
    return (f"Areas affected...portions of {area_full}\n\n"
            f"Concerning...{_concerning(case)}\n\n"
            f"Valid {valid_from} - {valid_to}\n\n"
            f"Probability of Watch Issuance...{case.probability} percent\n\n"
            f"SUMMARY...{summary}\n\n"
            f"DISCUSSION...{discussion}\n\n"
            f"..{_pick(rng, FORECASTERS)}.. {case.month:02d}/{case.day:02d}/{case.year}")


# ----------------------------------------------------------------------------------------------
# Layout


def _year_groups(num_files: int) -> list[list[int]]:
    """File i's years: the last file is the 2020 test year; the others split 2014-2019."""
    if num_files == 1:
        return [list(YEARS)]
    train_years = [y for y in YEARS if y != TEST_YEAR]
    if not 1 <= num_files - 1 <= len(train_years):
        raise ValueError(f"num_files must be in [1, {len(train_years) + 1}], got {num_files}")
    return [list(map(int, g)) for g in np.array_split(train_years, num_files - 1)] + [[TEST_YEAR]]


def _file_name(years: list[int]) -> str:
    span = f"{years[0]}" if len(years) == 1 else f"{years[0]}-{years[-1]}"
    return f"gemini_element_captions_{span}.json"


def _write(path: Path, data: bytes) -> None:
    # Plain writes (no fsync per image): the JSON files are written last and atomically, so a
    # killed run leaves no dataset that points at half-written images.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _case_rng(seed: int, case_number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, case_number]))


def _build_case(seed: int, case_number: int, year: int, serial: int, elements_per_case: int,
                image_px: int, out_dir: Path, path_prefix: str) -> dict:
    """Draw one case, write its GIFs, return its JSON dict."""
    rng = _case_rng(seed, case_number)
    case = _draw_case(rng, year, serial)
    areas = _areas(rng, case)
    if elements_per_case == len(COND_NAMES):
        conds = list(COND_NAMES)
    else:
        conds = [COND_NAMES[i] for i in sorted(rng.choice(len(COND_NAMES), elements_per_case, replace=False))]
    elements = []
    for cond in conds:
        el = _draw_element(rng, case, cond)
        rel = image_rel_path(case, cond)
        _write(out_dir / rel, render_gif(rng, case, el, image_px))
        elements.append({"image_rel_path": path_prefix + rel, "cond_name": cond,
                         "caption": make_caption(rng, case, el, " and ".join(areas[:2])),
                         "synthetic_factors": {"strength": el.strength, "extent": el.extent,
                                               "frames": el.frames}})
    return {"global_summary": make_summary(rng, case, areas), "elements": elements,
            "synthetic_factors": {"region": case.region, "strength": case.strength,
                                  "threat": case.threat, "probability": case.probability}}


# ----------------------------------------------------------------------------------------------
# Fault injection


def _inject_faults(corrupt: dict, files: list[tuple[Path, list[dict]]], out_dir: Path, seed: int) -> list[dict]:
    """Break the requested number of cases/elements in place: distinct targets, deterministic.

    Case faults take whole cases first; element faults then go to elements of other cases (a
    skipped case would hide them).
    """
    unknown = sorted(set(corrupt) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"corrupt: unknown fault kind(s) {unknown}; known: {sorted(FAULT_KINDS)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAD]))
    case_slots = [(f, c) for f, (_, cases) in enumerate(files) for c in range(len(cases))]
    case_slots = [case_slots[i] for i in rng.permutation(len(case_slots))]
    kinds = sorted(corrupt, key=lambda k: (k not in CASE_FAULTS, k))  # case faults first, fixed order
    injected = []
    for kind in (k for k in kinds if k in CASE_FAULTS):
        for _ in range(int(corrupt[kind])):
            if not case_slots:
                raise ValueError(f"corrupt: not enough cases for {corrupt}")
            f, c = case_slots.pop()
            injected.append(_apply_fault(kind, files[f], c, None, out_dir))
    slots = [(f, c, e) for f, c in case_slots for e in range(len(files[f][1][c]["elements"]))]
    slots = [slots[i] for i in rng.permutation(len(slots))]
    for kind in (k for k in kinds if k not in CASE_FAULTS):
        for _ in range(int(corrupt[kind])):
            if not slots:
                raise ValueError(f"corrupt: not enough elements for {corrupt}")
            f, c, e = slots.pop()
            injected.append(_apply_fault(kind, files[f], c, e, out_dir))
    return injected


def _apply_fault(kind: str, file: tuple[Path, list[dict]], c: int, e: Optional[int], out_dir: Path) -> dict:
    json_path, cases = file
    case = cases[c]
    record = {"kind": kind, "file": str(json_path), "case_index": c, "element_index": e,
              "image_rel_path": "", "expected_field": FAULT_KINDS[kind][0],
              "expected_reason": FAULT_KINDS[kind][1]}
    if kind == "empty_summary":
        case["global_summary"] = "   "
        return record
    element = case["elements"][e]
    rel = element["image_rel_path"]
    record["image_rel_path"] = rel
    image = out_dir / rel[rel.index("md_image/"):]
    if kind == "missing_image":
        image.unlink()
    elif kind == "empty_file":
        image.write_bytes(b"")
    elif kind == "corrupt_gif":
        data = image.read_bytes()
        image.write_bytes(data[: max(len(data) // 2, 16)])  # a GIF cut short mid-pixels
    elif kind == "not_an_image":
        image.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    elif kind == "bad_cond_name":
        element["cond_name"] = "not_a_type"
    elif kind == "missing_caption":
        del element["caption"]
    return record


# ----------------------------------------------------------------------------------------------
# Entry points


def generate(out_dir: str | Path, num_cases: int = 40, num_files: int = 2, seed: int = 0,
             elements_per_case: int = 20, image_px: int = 64, corrupt: Optional[dict] = None,
             progress: bool = False) -> list[Path]:
    """Write the dataset under `out_dir`; return the Gemini JSON paths (in year order).

    Deterministic given the arguments; `corrupt` changes only the cases/images it breaks.
    """
    if num_cases < num_files:
        raise ValueError(f"num_cases ({num_cases}) must be >= num_files ({num_files})")
    if not 1 <= elements_per_case <= len(COND_NAMES):
        raise ValueError(f"elements_per_case must be in [1, {len(COND_NAMES)}], got {elements_per_case}")
    if image_px < 16:
        raise ValueError(f"image_px must be >= 16, got {image_px}")
    out_dir = Path(out_dir)
    groups = _year_groups(num_files)
    per_file = [len(a) for a in np.array_split(np.arange(num_cases), num_files)]
    layout_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A7]))
    next_serial = {y: int(layout_rng.integers(100, 900)) for y in YEARS}

    files: list[tuple[Path, list[dict]]] = []
    bar = tqdm(total=num_cases, desc="synthetic cases", unit="case", disable=not progress)
    case_number = 0
    for f, (years, count) in enumerate(zip(groups, per_file)):
        prefix = "" if f == 0 else FOREIGN_PREFIX
        cases = []
        for k in range(count):
            year = years[k * len(years) // count]  # spread evenly, in year order
            serial = next_serial[year]
            next_serial[year] += int(layout_rng.integers(1, 20))
            cases.append(_build_case(seed, case_number, year, serial, elements_per_case, image_px,
                                     out_dir, prefix))
            case_number += 1
            bar.update()
        files.append((out_dir / _file_name(years), cases))
    bar.close()

    faults_file = out_dir / "injected_faults.json"
    if corrupt is not None:
        atomic_write_json(faults_file, _inject_faults(corrupt, files, out_dir, seed))
    else:
        faults_file.unlink(missing_ok=True)  # a stale one from an earlier run would mislead
    for path, cases in files:
        atomic_write_json(path, cases)
    return [path for path, _ in files]


@dataclass
class SyntheticConfig:
    """Generate a synthetic WeatherQA-like dataset (Gemini JSON + GIFs) whose texts depend on the images."""

    out: str = field(default="", metadata={"help": "output folder (becomes --image-root for the builder)"})
    num_cases: int = field(default=40, metadata={"help": "number of MD cases over all files"})
    num_files: int = field(default=2, metadata={"help": "number of Gemini JSON files (the last one is 2020)"})
    seed: int = field(default=0, metadata={"help": "random seed; the output is a pure function of it"})
    elements_per_case: int = field(default=20, metadata={"help": "images per case (<= 20, one per cond_name)"})
    image_px: int = field(default=64, metadata={"help": "side of the square GIFs in pixels"})
    corrupt: Optional[dict] = field(default=None, metadata={
        "help": f"JSON dict of fault kind -> count to inject, kinds: {sorted(FAULT_KINDS)}"})

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out is required")


@cli_main
def main(argv: Optional[list[str]] = None) -> list[Path]:
    cfg = parse_config(SyntheticConfig, argv)
    print_config(cfg)
    paths = generate(cfg.out, cfg.num_cases, cfg.num_files, cfg.seed, cfg.elements_per_case, cfg.image_px,
                     cfg.corrupt, progress=True)
    print(f"wrote {cfg.num_cases} cases x {cfg.elements_per_case} images under {Path(cfg.out).resolve()}")
    for p in paths:
        print(f"  {p}")
    if cfg.corrupt is not None:
        print(f"  injected faults: {Path(cfg.out) / 'injected_faults.json'}")
    return paths


if __name__ == "__main__":
    main()
