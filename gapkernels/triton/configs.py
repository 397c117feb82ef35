"""Launch configurations of the Triton kernels, chosen from the shape alone (no autotuning per
call; the same shape always gets the same configuration, so results are bitwise reproducible).

NOT MEASURED: there was no GPU where these were written. They are reasoned from the kernels'
memory traffic and should be re-tuned with the benchmark on an H100/H200:

- A full tile holds TILE_ELEMENTS = 4096 elements (ROWS x BLOCK_S, powers of two): 16 per
  thread at 8 warps, enough loads in flight per thread to hide memory latency while the 3-5
  float32 lane accumulators (sum, max, index, GeM's log-sum) stay in registers. Smaller tiles
  get fewer warps (`_num_warps`).
- NCS: BLOCK_S = the next of NCS_BLOCK_S >= S, at most 1024, so a row is read in long
  contiguous runs (S = 49 -> 64 lanes, 64 rows per tile: a 7x7 head is read as 64 rows at
  once); ROWS fills the rest of the tile. When full tiles give fewer than TARGET_PROGRAMS
  programs (2 per SM of a 132-SM H100), ROWS drops to 1 (one row per program).
- NSC: ROWS = a block of 64 consecutive channels (128-256 contiguous bytes per spatial offset,
  whole memory transactions), or 16 when C < 64 or 64-channel blocks give too few programs;
  BLOCK_S = the next power of four >= S, at most what fills the tile.
- If even then there are too few programs and S is long, the forward splits S into pieces of
  whole tiles over a second grid axis and a combine kernel reduces the pieces in order
  (deterministic); the backward has no reduction and always spreads S over its second grid axis.

The set of tiles is kept small on purpose (`tile_configs()` lists all of them): every one is
compiled for sm_80 and sm_90 by tests/test_triton_compile.py, which records their registers,
spills and shared memory in docs/triton_resources.md.
"""

from __future__ import annotations

from dataclasses import dataclass

TILE_ELEMENTS = 4096
TARGET_PROGRAMS = 264
# NCS BLOCK_S: powers of four up to 256 (1x1, 2x2, 4x4, 7x7/8x8 and 14x14/16x16 maps), then
# every power of two up to 1024; a short list, so that every tile can be compiled in CI.
NCS_BLOCK_S = (1, 4, 16, 64, 256, 512, 1024)
MAX_BLOCK_S = NCS_BLOCK_S[-1]
NSC_CHANNEL_BLOCKS = (64, 16)  # NSC ROWS: the first that gives enough programs, else the last
MIN_SPLIT_TILES = 4  # a forward piece of S is at least this many tiles long
MAX_GRID_Y = 65535  # CUDA's limit for the second grid dimension
BACKWARD_TILES_PER_PROGRAM = 4
COMBINE_ROWS = 128
COMBINE_WARPS = 4


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def next_power_of_4(n: int) -> int:
    p = next_power_of_2(n)
    return p if p.bit_length() % 2 else 2 * p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchConfig:
    rows: int  # ROWS: (n, c) rows per program
    block_s: int  # BLOCK_S: spatial offsets per loop step
    num_warps: int
    row_programs: int  # grid size along axis 0
    s_programs: int  # grid size along axis 1: pieces of S
    s_per_program: int  # length of one piece of S (a multiple of block_s unless it is S)


@dataclass(frozen=True)
class TileConfig:
    """What a compiled kernel depends on (besides mode, dtype and flags)."""

    channels_last: bool
    rows: int
    block_s: int
    num_warps: int
    max_block_s: bool  # BLOCK_S is the longest for these ROWS: S may be split, or be >= 2**31


def _num_warps(tile: int) -> int:
    if tile >= TILE_ELEMENTS:
        return 8
    if tile >= 1024:
        return 4
    return 2 if tile >= 256 else 1


def _row_programs(n: int, c: int, rows: int, channels_last: bool) -> int:
    return n * _cdiv(c, rows) if channels_last else _cdiv(n * c, rows)


def ncs_block_s(s: int) -> int:
    """The next of NCS_BLOCK_S >= s, or the largest."""
    return next((b for b in NCS_BLOCK_S if b >= s), NCS_BLOCK_S[-1])


def _nsc_max_block_s(rows: int) -> int:
    return TILE_ELEMENTS // rows


def _tile(n: int, c: int, s: int, channels_last: bool) -> tuple[int, int, int]:
    """(rows, block_s, row_programs): the tile shape, with rows reduced for small grids."""
    if channels_last:
        rows = NSC_CHANNEL_BLOCKS[-1]
        for candidate in NSC_CHANNEL_BLOCKS:
            if c >= candidate and _row_programs(n, c, candidate, True) >= TARGET_PROGRAMS:
                rows = candidate
                break
        block_s = min(next_power_of_4(s), _nsc_max_block_s(rows))
    else:
        block_s = ncs_block_s(s)
        rows = TILE_ELEMENTS // block_s
        if _row_programs(n, c, rows, False) < TARGET_PROGRAMS:
            rows = 1
    return rows, block_s, _row_programs(n, c, rows, channels_last)


def forward_config(n: int, c: int, s: int, channels_last: bool) -> LaunchConfig:
    rows, block_s, row_programs = _tile(n, c, s, channels_last)
    s_programs, s_per_program = 1, s
    tiles = _cdiv(s, block_s)
    if row_programs < TARGET_PROGRAMS and tiles >= 2 * MIN_SPLIT_TILES:
        wanted = min(_cdiv(TARGET_PROGRAMS, row_programs), tiles // MIN_SPLIT_TILES, MAX_GRID_Y)
        s_per_program = _cdiv(tiles, wanted) * block_s
        s_programs = _cdiv(s, s_per_program)
    return LaunchConfig(
        rows, block_s, _num_warps(rows * block_s), row_programs, s_programs, s_per_program
    )


def backward_config(n: int, c: int, s: int, channels_last: bool) -> LaunchConfig:
    rows, block_s, row_programs = _tile(n, c, s, channels_last)
    tiles = _cdiv(s, block_s)
    tiles_per_program = max(min(tiles, BACKWARD_TILES_PER_PROGRAM), _cdiv(tiles, MAX_GRID_Y))
    s_per_program = tiles_per_program * block_s
    return LaunchConfig(
        rows,
        block_s,
        _num_warps(rows * block_s),
        row_programs,
        _cdiv(s, s_per_program),
        s_per_program,
    )


def tile_configs() -> list[TileConfig]:
    """Every tile forward_config / backward_config can choose (tests check that it is so)."""
    tiles = []
    for block_s in NCS_BLOCK_S:
        for rows in sorted({TILE_ELEMENTS // block_s, 1}, reverse=True):
            tiles.append(
                TileConfig(False, rows, block_s, _num_warps(rows * block_s), block_s == MAX_BLOCK_S)
            )
    for rows in NSC_CHANNEL_BLOCKS:
        block_s = 4  # S >= 2: S == 1 is the NCS layout
        while block_s <= _nsc_max_block_s(rows):
            tiles.append(
                TileConfig(
                    True,
                    rows,
                    block_s,
                    _num_warps(rows * block_s),
                    block_s == _nsc_max_block_s(rows),
                )
            )
            block_s *= 4
    return tiles


def tile_of(config: LaunchConfig, channels_last: bool) -> TileConfig:
    max_block = _nsc_max_block_s(config.rows) if channels_last else MAX_BLOCK_S
    return TileConfig(
        channels_last, config.rows, config.block_s, config.num_warps, config.block_s == max_block
    )
