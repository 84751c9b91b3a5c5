"""Helpers every layer may use, above nothing of rsmtdf's own but `errors`: files written whole and
hashed (`files`), records compared field by field (`records`), the process's threads and allocator
(`runtime`), which process of a launch this is and which device it runs on (`launch`)."""
