"""Time to read the tag list from a model's answer, against the answer's size.

    python bench/parse.py

For answers built to trap a parser (60 KB of "[" took some 20 s a try with the earlier
regular expressions), and plain ones, at 16 KB to 1 MB: the median of 5 runs of
``parse_tag_answer`` each, and the time per KB against that at 16 KB.  Linear time
keeps that ratio near 1 whatever the size.
"""
import os
import statistics
import time

import common

SHAPES = {
    'nested "["': lambda size: '[' * size,
    '"[x" repeated': lambda size: '[x' * (size // 2),
    'unclosed string': lambda size: '["' + 'a' * size,
    'fences': lambda size: '```' * (size // 3),
    '"[" and spaces': lambda size: '[ ' * (size // 2),
    'prose, then a list': lambda size: 'word ' * (size // 5) + '["tag"]',
}
SIZES = (16_000, 64_000, 256_000, 1_000_000)


def main() -> None:
    os.environ.setdefault('WHITENOTE_SECRET', common.SECRET)
    import whitenote_huey
    print(common.machine())
    print('%-20s %s' % ('answer', '  '.join('%14s' % ('%d KB' % (size // 1000)) for size in SIZES)))
    for name, make in SHAPES.items():
        per_kb = []
        for size in SIZES:
            answer = make(size)
            times = []
            for _ in range(5):
                started = time.perf_counter()
                try:
                    whitenote_huey.parse_tag_answer(answer)
                except whitenote_huey.PermanentError:
                    pass
                times.append(time.perf_counter() - started)
            per_kb.append(statistics.median(times) / (size / 1000))
        print('%-20s %s' % (name, '  '.join('%7.3f ms %4.1fx' % (1000 * t * size / 1000, t / per_kb[0])
                                               for t, size in zip(per_kb, SIZES, strict=True))))


if __name__ == '__main__':
    main()
