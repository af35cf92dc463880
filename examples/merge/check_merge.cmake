# The test of qlora-merge (CTest and meson): runs it as a user would on the
# tiny Phi and the adapter of tests/data/lora/merge/ (made by
# tests/reference/merge_adapter.py) and checks the exit status, what it
# prints and the files it writes; the merged tensors themselves are compared
# with peft's by tests/lora/merge_adapter_test.cpp. Then the error paths.
#
#   cmake -DPROGRAM=<qlora-merge> -DDATA=<tests/data> -DWORK_DIR=<scratch folder> -P check_merge.cmake
cmake_minimum_required(VERSION 3.24)

foreach(var IN ITEMS PROGRAM DATA WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_merge.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(base "${DATA}/models/tiny_phi")
set(adapter "${DATA}/lora/merge/adapter")

# Runs PROGRAM with ARGN; fails unless it exits with `expected_status`. Leaves stdout + stderr in `output`.
function(run_program expected_status)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status STREQUAL expected_status)
    message(FATAL_ERROR "qlora-merge ${ARGN}: exit status ${status}, expected ${expected_status}\n"
                        "stdout: ${out}\nstderr: ${err}")
  endif()
  set(output "${out}${err}" PARENT_SCOPE)
endfunction()

function(expect_in text part)
  string(FIND "${text}" "${part}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "expected \"${part}\" in:\n${text}")
  endif()
endfunction()

function(expect_files folder)
  foreach(name IN LISTS ARGN)
    if(NOT EXISTS "${folder}/${name}")
      file(GLOB present RELATIVE "${folder}" "${folder}/*")
      message(FATAL_ERROR "${folder}/${name} was not written; the folder holds: ${present}")
    endif()
  endforeach()
endfunction()

# The tutorial's merge, sharded.
set(out "${WORK_DIR}/merged")
run_program(0 --base "${base}" --adapter "${adapter}" --out "${out}" --max-shard-size 300KB)
expect_in("${output}" "merged 12 LoRA modules")
expect_in("${output}" "replaced 15 tensors")
expect_in("${output}" "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json")
expect_files("${out}" config.json generation_config.json model.safetensors.index.json
             model-00001-of-00002.safetensors model-00002-of-00002.safetensors)
execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${out}/config.json"
                        "${DATA}/lora/merge/merged_f32/config.json" RESULT_VARIABLE different)
if(different)
  message(FATAL_ERROR "${out}/config.json differs from transformers' (lora/merge/merged_f32/config.json)")
endif()

# An existing output is refused, and replaced with --overwrite (one file this time).
run_program(1 --base "${base}" --adapter "${adapter}" --out "${out}")
expect_in("${output}" "[OutputExists]")
run_program(0 --base "${base}" --adapter "${adapter}" --out "${out}" --overwrite --dtype bfloat16)
expect_files("${out}" config.json model.safetensors)
if(EXISTS "${out}/model.safetensors.index.json")
  message(FATAL_ERROR "--overwrite left the old index in ${out}")
endif()

# A 4-bit base, a resized vocabulary.
run_program(0 --base "${DATA}/models/tiny_phi_bnb4bit" --adapter "${adapter}" --out "${WORK_DIR}/bnb" --dtype bfloat16)
expect_in("${output}" "dequantized 12 4-bit weights")
run_program(0 --base "${DATA}/lora/merge/base_bf16" --adapter "${DATA}/lora/merge/adapter_resized"
            --out "${WORK_DIR}/resized")
expect_in("${output}" "vocab_size = 128")

# An adapter that does not fit: named, and nothing written.
run_program(1 --base "${DATA}/models/tiny_internlm2" --adapter "${adapter}" --out "${WORK_DIR}/mismatch")
expect_in("${output}" "[AdapterMismatch]")
expect_in("${output}" "model.layers.0.mlp.fc1")
if(EXISTS "${WORK_DIR}/mismatch")
  message(FATAL_ERROR "a failed merge created ${WORK_DIR}/mismatch")
endif()

# Command lines it cannot use: exit status 2 and the usage.
run_program(2 --base "${base}" --adapter "${adapter}")
expect_in("${output}" "usage: qlora-merge")
run_program(2 --base "${base}" --adapter "${adapter}" --out "${WORK_DIR}/x" --max-shard-size 2XB)
expect_in("${output}" "shard size \"2XB\"")
run_program(2 --base "${base}" --adapter "${adapter}" --out "${WORK_DIR}/x" --dtype int8)
expect_in("${output}" "dtype \"int8\"")
