# The test of qlora-change_script (CTest and meson): runs it as a user would and
# compares what it writes, byte for byte, with what the XTuner tutorial's
# change_script.py writes for the same input (tests/data/data/change_script/,
# made by tests/reference/change_script.py). Then the error paths: a bad line
# (named, and the output left as it was), --skip-bad-lines, a bad command line.
#
#   cmake -DPROGRAM=<qlora-change_script> -DFIXTURES=<tests/data/data/change_script>
#         -DWORK_DIR=<scratch folder> -P check_change_script.cmake
cmake_minimum_required(VERSION 3.24)  # string(JSON)

foreach(var IN ITEMS PROGRAM FIXTURES WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_change_script.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
file(READ "${FIXTURES}/meta.json" meta)
string(JSON custom_old GET "${meta}" custom_old)
string(JSON custom_new GET "${meta}" custom_new)

# Runs PROGRAM with ARGN; fails unless it exits with `expected_status`. Leaves its stderr in `stderr`.
function(run_program expected_status)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status STREQUAL expected_status)
    message(FATAL_ERROR "qlora-change_script ${ARGN}: exit status ${status}, expected ${expected_status}\n"
                        "stdout: ${out}\nstderr: ${err}")
  endif()
  set(stderr "${err}" PARENT_SCOPE)
endfunction()

function(expect_same_file actual expected)
  execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${actual}" "${expected}" RESULT_VARIABLE different)
  if(different)
    file(READ "${actual}" text)
    message(FATAL_ERROR "${actual} differs from ${expected}; it holds:\n${text}")
  endif()
endfunction()

function(expect_in text part)
  string(FIND "${text}" "${part}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "expected \"${part}\" in:\n${text}")
  endif()
endfunction()

set(input "${FIXTURES}/input.jsonl")

# The tutorial's usage line, with its default texts.
run_program(0 "${input}" "${WORK_DIR}/default.jsonl")
expect_same_file("${WORK_DIR}/default.jsonl" "${FIXTURES}/expected_default.jsonl")
expect_in("${stderr}" "wrote 5 records")

# Texts as arguments, and in the tutorial's flags.
run_program(0 "${input}" "${WORK_DIR}/custom.jsonl" "${custom_old}" "${custom_new}")
expect_same_file("${WORK_DIR}/custom.jsonl" "${FIXTURES}/expected_custom.jsonl")
run_program(0 "${input}" "${WORK_DIR}/flags.jsonl" --old_text "${custom_old}" --new_text "${custom_new}")
expect_same_file("${WORK_DIR}/flags.jsonl" "${FIXTURES}/expected_custom.jsonl")

# In place: the output replaces the input only once it is complete.
file(COPY_FILE "${input}" "${WORK_DIR}/in_place.jsonl")
run_program(0 "${WORK_DIR}/in_place.jsonl" "${WORK_DIR}/in_place.jsonl")
expect_same_file("${WORK_DIR}/in_place.jsonl" "${FIXTURES}/expected_default.jsonl")

# A bad line stops it with file:line:column, and the output keeps its old content.
file(WRITE "${WORK_DIR}/bad.jsonl" "{\"a\": \"x\"}\n{\"a\": 1,}\n{\"b\": \"y\"}\n")
file(WRITE "${WORK_DIR}/bad_out.jsonl" "previous content\n")
run_program(1 "${WORK_DIR}/bad.jsonl" "${WORK_DIR}/bad_out.jsonl" x z)
expect_in("${stderr}" "[MalformedJson]")
expect_in("${stderr}" "bad.jsonl:2:9: invalid JSON: Expecting property name enclosed in double quotes")
file(READ "${WORK_DIR}/bad_out.jsonl" previous)
if(NOT previous STREQUAL "previous content\n")
  message(FATAL_ERROR "a failed run changed its output file: ${previous}")
endif()

# ... or, with --skip-bad-lines, is left out and reported.
run_program(0 "${WORK_DIR}/bad.jsonl" "${WORK_DIR}/bad_out.jsonl" x z --skip-bad-lines)
file(READ "${WORK_DIR}/bad_out.jsonl" skipped)
if(NOT skipped STREQUAL "{\"a\": \"z\"}\n{\"b\": \"y\"}\n")
  message(FATAL_ERROR "--skip-bad-lines wrote:\n${skipped}")
endif()
expect_in("${stderr}" "skipped 1 line (1 MalformedJson)")

# A command line it cannot use: exit status 2 and the usage, as argparse does.
run_program(2 "${input}")
expect_in("${stderr}" "usage: qlora-change_script INPUT OUTPUT")
# (execute_process directly: a function's ${ARGN} would drop the empty argument.)
execute_process(COMMAND "${PROGRAM}" "${input}" "${WORK_DIR}/empty_old.jsonl" "" "x" RESULT_VARIABLE status
                ERROR_VARIABLE stderr)
if(NOT status STREQUAL "2")
  message(FATAL_ERROR "an empty OLD: exit status ${status}, expected 2\n${stderr}")
endif()
expect_in("${stderr}" "the text to replace is empty")
run_program(1 "${WORK_DIR}/missing.jsonl" "${WORK_DIR}/out.jsonl")
expect_in("${stderr}" "[IoError]")
