"""The fixed class order shared by every dataset (DFEW's 0-based order) and name mapping.

Datasets disagree on class order (FERV39k codebases use two different ones), so labels are always
mapped by *name* through `label_from_name`, never by position.
"""

EMOTIONS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
NUM_CLASSES = len(EMOTIONS)

_ALIASES = {
    "happiness": "happy",
    "hap": "happy",
    "sadness": "sad",
    "neu": "neutral",
    "anger": "angry",
    "ang": "angry",
    "surprised": "surprise",
    "sur": "surprise",
    "disgusted": "disgust",
    "dis": "disgust",
    "fearful": "fear",
    "fea": "fear",
}


def label_from_name(name: str) -> int:
    """Index of an emotion name in `EMOTIONS` (case-insensitive; common aliases accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return EMOTIONS.index(key)
    except ValueError:
        raise ValueError(
            f"unknown expression label {name!r}; known labels are {', '.join(EMOTIONS)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        ) from None
