"""A synthetic GTZAN-shaped set: ten genres of made-up music in the original release's layout.

GTZAN cannot be downloaded everywhere, so everything downstream (download, pack, train)
can run on this set instead. The archive looks like the real `genres.tar.gz`:
`genres/<genre>/<genre>.000NN.au` (Sun .au, 22050 Hz, mono, 16-bit PCM) and the stray
Marsyas list files users find beside them in `genres/` (`input.mf`, `bextract_single.mf`
and one per genre, `bl.mf` .. `ro.mf`), each line `<clip path>\\t<genre>`.

The music is made so that a model has to look at the log-mel image: the genres differ in
tempo and rhythm pattern, instrument timbre, harmony and register, noise and distortion,
every clip draws its own tempo, key, instrument mix and levels, and neighbouring genres
share parts of their recipes (rock sits between blues and metal, pop and disco share
four-on-the-floor and synth pads). Every clip is normalised to a loudness drawn from one
range shared by all genres, so loudness alone says nothing about the genre.

Clip k of a genre comes from its own random stream (seed, genre, k): it does not depend
on how many clips are asked for, and one seed gives the same bytes on the same platform
and numpy version. Synthesis is vectorised over samples: loops run over parts, drum hits
and blocks of samples, never over single samples.

The package: `archive` writes the archive (the GTZAN layout, .au encoding, tar.gz);
`recipes` makes one clip of a genre, from the song grid (`song`), the instruments and
drums (`instruments`) and the signal helpers (`dsp`).
"""

from genreflow.data.synth.archive import ARCHIVE_MTIME, ARCHIVE_NAME, make_synthetic_gtzan
from genreflow.data.synth.dsp import SAMPLE_RATE
from genreflow.data.synth.recipes import LOUDNESS_RANGE_DB, synthesize_clip

__all__ = [
    "ARCHIVE_MTIME",
    "ARCHIVE_NAME",
    "LOUDNESS_RANGE_DB",
    "SAMPLE_RATE",
    "make_synthetic_gtzan",
    "synthesize_clip",
]
