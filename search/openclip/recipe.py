"""`pixel_recipe(preprocess)`: the `search.pixels.PixelRecipe` of an open_clip inference transform, or None.

open_clip's inference transform is a torchvision Compose: a resize (torchvision Resize, or open_clip's ResizeKeepRatio
for non-square 'shortest' and for 'longest'), a centre crop (torchvision CenterCrop, or CenterCropOrPad for 'longest';
none for 'squash'), convert("RGB"), to-tensor, Normalize. Steps are matched by exact type (a subclass may behave
differently), and anything else (an unknown step, random augmentation, max_size, a different order) gives None: the
caller then keeps torch's own transform, since the recipe must reproduce it bit for bit or not at all.
"""
from __future__ import annotations

import numbers

from ..pixels import INTERPOLATIONS, KEEP_RATIO, SHORTEST, SQUASH, PixelRecipe


def pixel_recipe(preprocess) -> PixelRecipe | None:
    """The recipe reproducing `preprocess` exactly on PIL images, or None when it has a step the recipe lacks."""
    import torchvision.transforms as T
    from open_clip import transform as oc

    steps = list(getattr(preprocess, "transforms", None) or []) if type(preprocess) is T.Compose else []
    if len(steps) not in (4, 5):
        return None
    resize, crop, tail = steps[0], (steps[1] if len(steps) == 5 else None), steps[-3:]
    converts = (type(tail[0]) is oc.MaybeConvertMode and tail[0].mode == "RGB") or \
        tail[0] is getattr(oc, "_convert_to_rgb", None)  # older open_clip releases
    if not (converts and type(tail[1]) in (T.ToTensor, oc.MaybeToTensor) and type(tail[2]) is T.Normalize):
        return None
    resized = _resize(resize, T, oc)
    cropped = _crop(crop, T, oc)
    normalize = tail[2]
    mean, std = _floats(normalize.mean), _floats(normalize.std)
    if resized is None or cropped is None or mean is None or std is None:
        return None
    mode, size, longest, interpolation = resized
    crop_size, fill = cropped
    try:
        return PixelRecipe(resize_mode=mode, resize_size=size, interpolation=interpolation, crop_size=crop_size,
                           mean=mean, std=std, longest=longest, crop_fill=fill)
    except ValueError:  # e.g. 'shortest' without a crop: the output size would vary with the image
        return None


def _resize(step, T, oc):
    """(resize_mode, resize_size, longest, interpolation name) of a resize step, or None."""
    interpolation = getattr(getattr(step, "interpolation", None), "value", None)
    if interpolation not in INTERPOLATIONS:
        return None
    if type(step) is T.Resize:
        if step.max_size is not None:
            return None
        size = step.size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size,)
        size = _ints(size)
        if size is None or len(size) not in (1, 2):
            return None
        return (SHORTEST if len(size) == 1 else SQUASH), size, 0.0, interpolation
    if type(step) is oc.ResizeKeepRatio:
        size = _ints(step.size)
        if step.random_scale_prob > 0 or step.random_aspect_prob > 0 or size is None or len(size) != 2:
            return None
        return KEEP_RATIO, size, float(step.longest), interpolation
    return None


def _crop(step, T, oc):
    """(crop_size or None, fill) of the optional crop step, or None when it is some other step."""
    if step is None:
        return None, 0
    if type(step) is T.CenterCrop:
        fill = 0  # torchvision pads a PIL image with 0
    elif type(step) is oc.CenterCropOrPad and isinstance(step.fill, int) and not isinstance(step.fill, bool):
        fill = step.fill
    else:
        return None
    size = _ints(step.size)
    return (size, fill) if size is not None and len(size) == 2 else None


def _ints(values) -> tuple[int, ...] | None:
    try:
        values = tuple(values)
    except TypeError:
        return None
    return values if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None


def _floats(values) -> tuple[float, ...] | None:
    """Normalize's mean or std as 3 Python floats (what torch converts to float32 from), or None."""
    if isinstance(values, numbers.Real):
        values = (values,) * 3  # torch broadcasts a scalar over the channels
    try:
        values = tuple(values)
    except TypeError:
        return None
    if len(values) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        return None
    return tuple(float(v) for v in values)
