"""merge_pages: the first ids past a cursor over several id-ordered sources, read sparingly."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from redflow.storage.index import PageSource, merge_pages


def _sources(lists: list[list[str]], descending: bool, reads: list[int]) -> list[PageSource]:
    def source(ids: list[str]) -> PageSource:
        ordered = sorted(ids, reverse=descending)

        async def read(after: str | None, count: int) -> list[str]:
            assert count >= 1
            past = [i for i in ordered if after is None or (i < after if descending else i > after)]
            reads.append(min(count, len(past)))
            return past[:count]
        return read
    return [source(ids) for ids in lists]


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.tuples(st.integers(0, 7), st.text("abcdefgh", min_size=1, max_size=4)), max_size=80,
                 unique_by=lambda t: t[1]),
    limit=st.integers(1, 30),
    descending=st.booleans(),
    cursor=st.one_of(st.none(), st.text("abcdefgh", min_size=1, max_size=3)),
)
def test_page_is_the_top_of_the_merged_sources(
    ids: list[tuple[int, str]], limit: int, descending: bool, cursor: str | None,
) -> None:
    lists: list[list[str]] = [[] for _ in range(8)]
    for source, run_id in ids:
        lists[source].append(run_id)
    reads: list[int] = []
    page = asyncio.run(merge_pages(_sources(lists, descending, reads), cursor, limit, descending))
    everything = sorted((i for _, i in ids), reverse=descending)
    past = [i for i in everything if cursor is None or (i < cursor if descending else i > cursor)]
    assert page == past[:limit]


def test_an_even_spread_reads_about_one_page() -> None:
    """16 sources of 10,000 ids each, interleaved: a page of 50 reads far fewer than 16 x 50 ids."""
    lists = [[f"{n:08d}" for n in range(s, 160_000, 16)] for s in range(16)]
    for descending in (False, True):
        reads: list[int] = []
        page = asyncio.run(merge_pages(_sources(lists, descending, reads), None, 50, descending))
        assert len(page) == 50
        assert sum(reads) <= 2 * 16 * 4 + 50, reads


def test_a_skewed_spread_reads_again_only_where_needed() -> None:
    """All the newest ids in one source: that source is read again, for no more than the page."""
    lists = [[f"{n:08d}" for n in range(1000, 2000)]] + [[f"{n:08d}" for n in range(s, 1000, 15)] for s in range(15)]
    reads: list[int] = []
    page = asyncio.run(merge_pages(_sources(lists, True, reads), None, 50, True))
    assert page == [f"{n:08d}" for n in range(1999, 1949, -1)]
    assert sum(reads) <= 16 * 8 + 50, reads
