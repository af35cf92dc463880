# Runs qlora-chat as a user would (cmake -DPROGRAM=... -DMODEL=... -DTOKENIZER=... -P check_chat.cmake):
# a one-shot answer from the tiny test model with a small byte-level BPE whose ids fit its
# vocabulary of 200 (generation itself is checked against transformers in tests/models), and
# the error paths: each must exit non-zero with a message that names the problem.
function(run_chat expected_status expected_text)
  execute_process(COMMAND ${PROGRAM} ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL expected_status)
    message(FATAL_ERROR "qlora-chat ${ARGN}: exit status ${status}, expected ${expected_status}\nstdout: ${out}\nstderr: ${err}")
  endif()
  string(FIND "${out}${err}" "${expected_text}" found)
  if(found EQUAL -1)
    message(FATAL_ERROR "qlora-chat ${ARGN}: the output lacks \"${expected_text}\"\nstdout: ${out}\nstderr: ${err}")
  endif()
endfunction()

# One answer, then exit 0 (the answer ends with a newline).
run_chat(0 "\n" --model ${MODEL} --tokenizer ${TOKENIZER} --template none --prompt "hello world" --max-new-tokens 5)
# Sampling options go through too.
run_chat(0 "\n" --model ${MODEL} --tokenizer ${TOKENIZER} --template none --prompt "hello world" --max-new-tokens 5
         --temperature 0.8 --top-k 10 --top-p 0.9 --seed 3)
run_chat(1 "no such folder" --model ${MODEL}/does_not_exist --prompt hi)
run_chat(1 "MissingTokenizer" --model ${MODEL} --prompt hi)
# A ChatML template needs <|im_start|> as one token; this tokenizer has none.
run_chat(1 "UnknownSpecialToken" --model ${MODEL} --tokenizer ${TOKENIZER} --template chatml --prompt hi)
run_chat(2 "unknown template" --model ${MODEL} --template alpaca)
run_chat(2 "--top-p" --model ${MODEL} --top-p 1.5)
