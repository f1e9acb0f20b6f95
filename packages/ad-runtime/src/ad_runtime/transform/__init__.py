"""Runtime-stage graph transforms (cache_init, compile), registered in ad_compiler's TransformRegistry."""
