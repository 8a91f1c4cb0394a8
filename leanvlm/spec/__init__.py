"""What an engine is, without torch: IO and node names (`names`), precisions (`precision`), defaults
(`defaults`), the manifest (`manifest`) and the typed engine spec parsed from it (`engine`). Export writes
these; engines, backends and the runtime read them. Import the submodules directly."""
