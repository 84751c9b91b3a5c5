"""Stage two: the replayed views and loaders (`loader`), targets and losses (`losses`), the run
(`trainer`), its folder and logs (`runs`, `runlog`), and multi-process set-up (`distributed`)."""
