"""Named architecture specs in a registry that refuses duplicate names.

All presets default to the 3 COVIDx classes (`normal`, `pneumonia`, `COVID-19`); change them
with `spec.with_num_classes(k)`, `spec.with_head_classes(names)` and `spec.with_input_size(n)`.

- `tiny`: a test-sized PEPX network (32 px, 2 stages, a few channels).
- `covidnet-prototype`: the paper's Figure 2 topology (224 px, 7x7/2 stem + 2x2 max-pool,
  3-4-6-3 PEPX modules at 256/512/1024/2048, dense links, flatten -> FC1024 -> FC1024).
  The paper publishes no inner widths; ours are out/4 -> out/2 -> out/4 -> out.
- `covidnet-b`, `covidnet-c`: 480 px designs with heterogeneous per-module widths and a
  global-average-pool head, inside the CXR3-B budget (<= 11.75 M params, <= 7.50 G MACs) and
  the CXR3-C budget (<= 9.2 M params, <= 5.55 G MACs).
- `resnet50`, `vgg19`: the paper's baselines (torchvision layouts).

Example:
    >>> "tiny" in list_presets()
    True
    >>> get_preset("tiny").input_size
    32
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from covidnet_jax.arch import (
    AnySpec,
    ArchSpec,
    HeadSpec,
    ModuleSpec,
    ResNetSpec,
    StageSpec,
    StemSpec,
    VGGSpec,
    spec_from_json,
)
from covidnet_jax.errors import SpecError

_PRESETS: dict[str, Callable[[], AnySpec]] = {}


def register_preset(name: str, make: Callable[[], AnySpec]) -> None:
    """Adds a named spec factory to the registry.

    Raises:
        ValueError: if `name` is already registered (names are never silently replaced).
    """
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = make


def list_presets() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> AnySpec:
    """The spec registered as `name`.

    Raises:
        SpecError: if no preset has that name (the message lists the known names).
    """
    try:
        make = _PRESETS[name]
    except KeyError:
        raise SpecError(
            f"preset: unknown name {name!r}; known presets: {', '.join(list_presets())}"
        ) from None
    return make()


def load_spec(name_or_path: str | Path) -> AnySpec:
    """A preset by name, or a spec JSON file (any spec type, dispatched on its "type").

    Raises:
        SpecError: "<file>: <field path>: <problem>" for a bad file; an unknown name that is
            not a file either lists the presets.
    """
    text = str(name_or_path)
    if text in _PRESETS:
        return get_preset(text)
    path = Path(text)
    if not path.is_file():
        if path.suffix or path.parent != Path("."):
            raise SpecError(f"{path}: spec file not found")
        raise SpecError(
            f"{text!r} is neither a preset nor a spec file; presets: {', '.join(list_presets())}"
        )
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read spec file ({err})") from None
    try:
        return spec_from_json(content)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def _pepx(proj1: int, expand: int, proj2: int, out: int, kernel_size: int = 3) -> ModuleSpec:
    return ModuleSpec(proj1, expand, proj2, out, kernel_size)


def tiny() -> ArchSpec:
    """32 px, 8-channel stem, two dense stages (16 and 32 channels): for tests."""
    return ArchSpec(
        input_size=32,
        stem=StemSpec(channels=8, kernel_size=3, stride=2, pool_size=0),
        stages=(
            StageSpec(stride=1, modules=(_pepx(4, 16, 4, 16), _pepx(8, 16, 8, 16))),
            StageSpec(stride=2, modules=(_pepx(8, 32, 8, 32, 5),)),
        ),
    )


def covidnet_prototype() -> ArchSpec:
    """The paper's Figure 2 prototype at 224 px (inner widths are ours: out/4, out/2, out/4)."""
    stages = []
    for i, (depth, width) in enumerate(zip((3, 4, 6, 3), (256, 512, 1024, 2048), strict=True)):
        module = _pepx(width // 4, width // 2, width // 4, width)
        stages.append(StageSpec(stride=1 if i == 0 else 2, modules=(module,) * depth))
    return ArchSpec(
        input_size=224,
        stem=StemSpec(channels=64, kernel_size=7, stride=2, pool_size=2, pool_stride=2),
        stages=tuple(stages),
        connectivity="dense",
        head=HeadSpec(pool="flatten", hidden=(1024, 1024)),
    )


def _design_480(
    stem_channels: int, stages: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...]
) -> ArchSpec:
    """A 480 px dense design: 7x7/2 stem + 2x2 max-pool, stage strides 1, 2, 2, 2, GAP head.

    `stages` holds `(width, modules)` with each module `(proj1, expand, proj2[, kernel])`.
    """
    return ArchSpec(
        input_size=480,
        stem=StemSpec(channels=stem_channels, kernel_size=7, stride=2, pool_size=2),
        stages=tuple(
            StageSpec(
                stride=1 if i == 0 else 2,
                modules=tuple(_pepx(*module[:3], width, *module[3:]) for module in modules),
            )
            for i, (width, modules) in enumerate(stages)
        ),
        connectivity="dense",
        head=HeadSpec(pool="avg"),
    )


def covidnet_b() -> ArchSpec:
    """480 px design inside the CXR3-B budget (<= 11.75 M params, <= 7.50 G MACs).

    6.98 M params, 6.58 G MACs (88% of the MAC budget): 3-4-6-3 dense PEPX stages at
    144/288/576/1280 channels, inner widths varied per module, a 5x5 depthwise conv where
    the last stage downsamples.
    """
    return _design_480(
        64,
        (
            (144, ((48, 144, 48), (40, 120, 40), (48, 144, 48))),
            (288, ((72, 232, 72), (64, 200, 64), (72, 216, 72), (80, 248, 80))),
            (
                576,
                (
                    (144, 440, 144),
                    (128, 392, 128),
                    (144, 432, 144),
                    (120, 368, 120),
                    (144, 432, 144),
                    (160, 488, 160),
                ),
            ),
            (1280, ((320, 960, 320, 5), (288, 864, 288), (320, 960, 320))),
        ),
    )


def covidnet_c() -> ArchSpec:
    """480 px design inside the CXR3-C budget (<= 9.2 M params, <= 5.55 G MACs).

    4.50 M params, 4.81 G MACs (87% of the MAC budget): 2-3-5-2 dense PEPX stages at
    144/288/576/1152 channels, inner widths varied per module.
    """
    return _design_480(
        48,
        (
            (144, ((48, 136, 48), (40, 120, 40))),
            (288, ((72, 216, 72), (64, 184, 64), (72, 208, 72))),
            (
                576,
                (
                    (144, 432, 144),
                    (120, 360, 120),
                    (136, 408, 136),
                    (128, 376, 128),
                    (152, 456, 152),
                ),
            ),
            (1152, ((288, 864, 288, 5), (256, 768, 256))),
        ),
    )


def resnet50() -> ResNetSpec:
    """ResNet-50 v1.5 at 224 px (25,557,032 params with 1000 classes)."""
    return ResNetSpec(input_size=224)


def vgg19() -> VGGSpec:
    """VGG-19 (no BatchNorm) at 224 px (143,667,240 params with 1000 classes)."""
    return VGGSpec(input_size=224)


for _name, _make in (
    ("tiny", tiny),
    ("covidnet-prototype", covidnet_prototype),
    ("covidnet-b", covidnet_b),
    ("covidnet-c", covidnet_c),
    ("resnet50", resnet50),
    ("vgg19", vgg19),
):
    register_preset(_name, _make)
