# The data-parallel test of qlora-train (CTest label "mpi"): the shipped tiny
# model, 4 steps of 2 micro-batches, LoRA dropout on, three ways:
#   * one process, gradient_accumulation_steps 2;
#   * mpirun -np 2, gradient_accumulation_steps 1 (a micro-batch per rank), ZeRO stage 2;
#   * mpirun -np 2 for 2 steps with ZeRO stage 1, then one process resumes that
#     checkpoint (saved by 2 ranks) with accumulation 2 for the last 2 steps.
# Every run sees the same global batches with the same dropout masks, so the
# first step's loss must be the same bits, and the later ones equal to the
# fp32 summation order of the ranks' gradients: the first 6 significant digits
# (measured differences ~1e-8 relative). Only rank 0 writes: one metrics file,
# one adapter.
#
#   cmake -DPROGRAM=<qlora-train> -DMPIEXEC=<mpiexec> -DWORK_DIR=<scratch> -P check_train_mpi.cmake
cmake_minimum_required(VERSION 3.24)

foreach(var IN ITEMS PROGRAM MPIEXEC WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_train_mpi.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
# OpenMPI refuses root unless told, and more ranks than cores unless oversubscribed (CI: 2 cores, root).
set(ENV{OMPI_ALLOW_RUN_AS_ROOT} 1)
set(ENV{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM} 1)
set(mpirun "${MPIEXEC}" -np 2 --oversubscribe)
set(common --eval_prompts= --save_steps 2 --eval_steps 2 --lora_dropout 0.05 --threads 1)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${ARGN}: exit status ${status}\nstdout: ${out}\nstderr: ${err}")
  endif()
  set(stdout "${out}" PARENT_SCOPE)
endfunction()

# The losses of a metrics.jsonl's train records, cut to 6 significant digits
# (all of them for step 1, whose loss is computed before any reduction).
function(losses file out_var)
  file(STRINGS "${file}" lines REGEX "\"loss\"")
  set(values)
  foreach(line IN LISTS lines)
    string(REGEX MATCH "\"loss\":([0-9.eE+-]+)" _ "${line}")
    list(APPEND values "${CMAKE_MATCH_1}")
  endforeach()
  list(LENGTH values count)
  if(NOT count EQUAL 4)
    message(FATAL_ERROR "${file}: ${count} train records, expected 4")
  endif()
  list(TRANSFORM values REPLACE "^([0-9]\\.[0-9][0-9][0-9][0-9][0-9]).*" "\\1" AT 1 2 3)
  set(${out_var} "${values}" PARENT_SCOPE)
endfunction()

run("${PROGRAM}" ${common} --max_steps 4 --gradient_accumulation_steps 2 --output_dir "${WORK_DIR}/one")
run(${mpirun} "${PROGRAM}" ${common} --max_steps 4 --gradient_accumulation_steps 1 --zero_stage 2
    --output_dir "${WORK_DIR}/two")
string(FIND "${stdout}" "2 ranks x accumulation 1, ZeRO stage 2" at)
if(at EQUAL -1)
  message(FATAL_ERROR "the 2-rank run did not say it ran on 2 ranks:\n${stdout}")
endif()
run(${mpirun} "${PROGRAM}" ${common} --max_steps 2 --gradient_accumulation_steps 1 --zero_stage 1
    --output_dir "${WORK_DIR}/mixed")
run("${PROGRAM}" ${common} --max_steps 4 --gradient_accumulation_steps 2 --output_dir "${WORK_DIR}/mixed")
string(FIND "${stdout}" "Resumed from ${WORK_DIR}/mixed/checkpoint-2 (step 2)" at)
if(at EQUAL -1)
  message(FATAL_ERROR "one process did not resume the 2-rank checkpoint:\n${stdout}")
endif()

losses("${WORK_DIR}/one/metrics.jsonl" one)
foreach(run IN ITEMS two mixed)
  losses("${WORK_DIR}/${run}/metrics.jsonl" other)
  if(NOT other STREQUAL one)
    message(FATAL_ERROR "run ${run}'s losses ${other} differ from one process's ${one}")
  endif()
  foreach(path IN ITEMS adapter/adapter_model.safetensors checkpoint-2/optimizer.safetensors)
    if(NOT EXISTS "${WORK_DIR}/${run}/${path}")
      message(FATAL_ERROR "run ${run} left no ${path}")
    endif()
  endforeach()
endforeach()
message(STATUS "losses of one process, 2 ranks and 2 ranks resumed by one: ${one}")
