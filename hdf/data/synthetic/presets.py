"""Named sources of the synthetic benchmark: each a camera, a timing, a population, a label mix and
a size, chosen to differ the way real DFER sources do (docs/design.md §5).

`DEFAULT_SOURCES` is the fixed, ordered federation used when the data config names no sources; its
order gives each source its stable index. `night_ir` is the small source unlike the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hdf.classes import EMOTIONS
from hdf.data.synthetic.camera import Camera
from hdf.data.synthetic.faces import Population
from hdf.data.synthetic.timing import Timing

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Preset:
    """One synthetic source: everything that makes its clips look and behave the way they do."""

    name: str
    description: str
    camera: Camera = field(default_factory=Camera)
    timing: Timing = field(default_factory=Timing)
    population: Population = field(default_factory=Population)
    labels: tuple[float, ...] = (1,) * len(EMOTIONS)  # class weights in EMOTIONS order
    sizes: tuple[int, int, int] = (320, 80, 128)  # clips in train, val, test at scale 1
    backgrounds: tuple[RGB, ...] = ((0.6, 0.6, 0.6),)  # scene tints the backgrounds vary around
    shirts: tuple[RGB, ...] = ((0.2, 0.3, 0.5), (0.5, 0.2, 0.2), (0.3, 0.3, 0.3), (0.8, 0.8, 0.75))

    def __post_init__(self) -> None:
        if len(self.labels) != len(EMOTIONS):
            raise ValueError(f"preset {self.name!r}: labels needs {len(EMOTIONS)} weights")

    def params(self) -> dict:
        """Every parameter as plain data (hashed into the cache key)."""
        return asdict(self)


def _mix(**w: float) -> tuple[float, ...]:
    """Class weights by name; unnamed classes weigh 1."""
    return tuple(float(w.get(name, 1.0)) for name in EMOTIONS)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "studio",
            "posed lab recordings: HD, even light, clean onsets, strong expressions, balanced",
            Camera(
                res=1.34,
                cast_jitter=0.02,
                exposure_jitter=0.05,
                contrast=1.05,
                blur=0.4,
                noise=0.01,
                light=0.1,
            ),
            Timing(duration=2.5, fps=30, onset=(0.1, 0.4), start_jitter=0.1),
            Population(
                intensity=1.0,
                intensity_spread=0.2,
                motion=0.4,
                talk=0.05,
                glasses=0.1,
                beard=0.1,
                rest=0.1,
            ),
            _mix(),
            (320, 80, 128),
            ((0.75, 0.75, 0.75), (0.85, 0.85, 0.88), (0.55, 0.62, 0.7)),
        ),
        Preset(
            "webcam",
            "video calls: low-res warm webcam, JPEG, 15 fps with drops, talking, ~no disgust",
            Camera(
                res=0.67,
                gain=(1.12, 1.0, 0.8),
                cast_jitter=0.06,
                exposure=0.9,
                exposure_jitter=0.15,
                flicker=0.02,
                contrast=0.9,
                gamma=1.1,
                blur=0.6,
                noise=0.035,
                jpeg=45,
                light=0.2,
            ),
            Timing(duration=3.0, fps=15, drop=0.1, dup=0.05, onset=(0.0, 0.5)),
            Population(
                skin=(2, 3, 2, 1, 1, 0.5),
                intensity=0.7,
                intensity_spread=0.3,
                motion=1.0,
                talk=0.5,
                glasses=0.35,
                rest=0.2,
            ),
            _mix(happy=3, neutral=3, surprise=1, disgust=0.06, fear=0.5),
            (360, 90, 144),
            ((0.8, 0.72, 0.6), (0.55, 0.42, 0.3), (0.9, 0.9, 0.85)),
        ),
        Preset(
            "movie",
            "film scenes: graded colour, hard contrast, side light, 24 fps telecine, big motion",
            Camera(
                gain=(1.06, 0.98, 0.9),
                cast_jitter=0.05,
                exposure=0.9,
                exposure_jitter=0.2,
                contrast=1.3,
                gamma=1.15,
                blur=0.5,
                noise=0.02,
                jpeg=70,
                light=0.45,
            ),
            Timing(duration=2.0, fps=24, dup=0.12, onset=(-0.25, 0.4), start_jitter=0.3),
            Population(
                skin=(2, 2, 2, 2, 1, 1),
                intensity=0.9,
                intensity_spread=0.3,
                motion=2.0,
                talk=0.6,
                glasses=0.05,
                beard=0.25,
                rest=0.2,
            ),
            _mix(happy=1.5, sad=1.5, neutral=1.5, angry=1.5, disgust=0.5),
            (300, 75, 120),
            ((0.2, 0.25, 0.3), (0.35, 0.3, 0.25), (0.15, 0.15, 0.2), (0.4, 0.45, 0.5)),
        ),
        Preset(
            "phone",
            "hand-held selfies: bright, cool, heavy JPEG, variable frame rate, shaky, many smiles",
            Camera(
                res=0.84,
                gain=(0.97, 1.0, 1.08),
                exposure=1.1,
                exposure_jitter=0.2,
                flicker=0.04,
                contrast=1.1,
                gamma=0.85,
                blur=0.8,
                noise=0.03,
                jpeg=25,
                light=0.25,
            ),
            Timing(duration=2.5, fps=30, drop=0.2, dup=0.05, onset=(0.05, 0.5)),
            Population(
                skin=(1, 2, 2, 2, 2, 2),
                intensity=0.8,
                motion=2.5,
                talk=0.35,
                glasses=0.1,
                beard=0.1,
                rest=0.15,
            ),
            _mix(happy=2.5, surprise=1.5, disgust=0.7),
            (280, 70, 112),
            ((0.6, 0.75, 0.9), (0.4, 0.6, 0.35), (0.85, 0.8, 0.7)),
        ),
        Preset(
            "cctv",
            "surveillance / waiting rooms: grayscale, low-res, 6 fps, noisy, subtle expressions",
            Camera(
                res=0.5,
                mode="gray",
                exposure=0.85,
                contrast=0.75,
                vignette=0.3,
                blur=0.5,
                noise=0.03,
                jpeg=35,
                light=0.3,
            ),
            Timing(duration=3.0, fps=6, drop=0.05, dup=0.1, onset=(0.05, 0.5)),
            Population(
                intensity=0.65, motion=0.8, talk=0.3, glasses=0.2, beard=0.2, bald=0.2, rest=0.25
            ),
            _mix(neutral=3, sad=2, angry=1.5, surprise=0.7),
            (300, 75, 120),
            ((0.5, 0.5, 0.45), (0.35, 0.38, 0.4), (0.65, 0.62, 0.55)),
        ),
        Preset(
            "night_ir",
            "small night-ward IR camera: infrared look, dark rooms, very noisy, faint expressions",
            Camera(
                res=0.67,
                mode="ir",
                contrast=0.9,
                gamma=1.0,
                vignette=0.6,
                blur=0.7,
                noise=0.04,
                jpeg=40,
                light=0.1,
            ),
            Timing(duration=3.0, fps=10, drop=0.1, dup=0.15, onset=(0.1, 0.6)),
            Population(
                intensity=0.45,
                intensity_spread=0.35,
                motion=0.6,
                talk=0.1,
                blink_rate=0.15,
                glasses=0.4,
                beard=0.3,
                bald=0.3,
                rest=0.3,
                clips_per_id=6.0,
            ),
            _mix(happy=0.6, sad=2, neutral=3, fear=1.5),
            (90, 24, 60),
            ((0.15, 0.15, 0.15), (0.3, 0.3, 0.3)),
        ),
    ]
}

DEFAULT_SOURCES: tuple[str, ...] = ("studio", "webcam", "movie", "phone", "cctv", "night_ir")
