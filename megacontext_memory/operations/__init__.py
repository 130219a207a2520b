"""Operations that need the engine (export/import/reindex, the crash harness), above `store/`."""
