# Consumption tests, run by CTest as `cmake -P` (see tests/CMakeLists.txt).
#
# Inputs (-D): MODE, WORK_DIR, QLORA_SOURCE_DIR, QLORA_BINARY_DIR, EXPECTED_VERSION,
#              CONSUMER_GENERATOR, CONSUMER_CXX_COMPILER, CONSUMER_BUILD_TYPE.
# MODE:
#   find_package      cmake --install to WORK_DIR/prefix; consumer uses find_package(qlora 0.1)
#   build_tree        consumer uses find_package with qlora_DIR = the build tree (export())
#   add_subdirectory  consumer adds the source tree with add_subdirectory()
#   version_reject    find_package(qlora 1.0) and (qlora 0.2) must fail against the install
#   pkg_config        compile the consumer by hand with `pkg-config --cflags --libs qlora`
#   meson_subproject  a meson project with subprojects/qlora -> the source tree
# A mode whose tool is missing prints QLORA_SKIP (CTest reports it as skipped).
cmake_minimum_required(VERSION 3.24)

foreach(var MODE WORK_DIR QLORA_SOURCE_DIR QLORA_BINARY_DIR EXPECTED_VERSION)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
set(consumer_src ${QLORA_SOURCE_DIR}/tests/install/consumer)
set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# Run a command; stop with its output unless it succeeds. OUTPUT_VAR gets stdout+stderr.
function(run)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUTPUT_VAR;WORKING_DIRECTORY" "COMMAND")
  if(NOT arg_WORKING_DIRECTORY)
    set(arg_WORKING_DIRECTORY ${WORK_DIR})
  endif()
  string(REPLACE ";" " " shown "${arg_COMMAND}")
  message(STATUS "run: ${shown}")
  execute_process(COMMAND ${arg_COMMAND} WORKING_DIRECTORY ${arg_WORKING_DIRECTORY}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${shown}\n${out}")
  endif()
  if(arg_OUTPUT_VAR)
    set(${arg_OUTPUT_VAR} "${out}" PARENT_SCOPE)
  endif()
endfunction()

function(install_qlora)
  set(config_args)
  if(CONSUMER_BUILD_TYPE)
    set(config_args --config ${CONSUMER_BUILD_TYPE})
  endif()
  run(COMMAND ${CMAKE_COMMAND} --install ${QLORA_BINARY_DIR} --prefix ${prefix} ${config_args})
  foreach(file include/qlora/version.hpp share/cmake/qlora/qloraConfig.cmake
               share/cmake/qlora/qloraConfigVersion.cmake share/cmake/qlora/qloraTargets.cmake
               share/pkgconfig/qlora.pc share/doc/qlora/LICENSE)
    if(NOT EXISTS ${prefix}/${file})
      message(FATAL_ERROR "install is missing ${file}")
    endif()
  endforeach()
  # Header-only and arch-independent: nothing may land in lib/.
  file(GLOB_RECURSE arch_files ${prefix}/lib/* ${prefix}/lib64/*)
  if(arch_files)
    message(FATAL_ERROR "header-only install put files under lib: ${arch_files}")
  endif()
endfunction()

# Configure (extra args), build and run the CMake consumer; check what it prints.
function(cmake_consumer)
  set(build ${WORK_DIR}/consumer-build)
  set(args -S ${consumer_src} -B ${build} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  if(CONSUMER_GENERATOR)
    list(APPEND args -G ${CONSUMER_GENERATOR})
  endif()
  if(CONSUMER_CXX_COMPILER)
    list(APPEND args -DCMAKE_CXX_COMPILER=${CONSUMER_CXX_COMPILER})
  endif()
  if(CONSUMER_BUILD_TYPE)
    list(APPEND args -DCMAKE_BUILD_TYPE=${CONSUMER_BUILD_TYPE})
  endif()
  run(COMMAND ${CMAKE_COMMAND} ${args} ${ARGN} OUTPUT_VAR configure_out)
  message(STATUS "${configure_out}")
  run(COMMAND ${CMAKE_COMMAND} --build ${build})
  find_program(consumer_exe consumer PATHS ${build} ${build}/${CONSUMER_BUILD_TYPE}
               NO_DEFAULT_PATH NO_CACHE REQUIRED)
  run(COMMAND ${consumer_exe} OUTPUT_VAR out)
  check_version_output("${out}")
  set(configure_out "${configure_out}" PARENT_SCOPE)
endfunction()

function(check_version_output out)
  if(NOT out MATCHES "qlora ${EXPECTED_VERSION}")
    message(FATAL_ERROR "consumer printed '${out}', expected 'qlora ${EXPECTED_VERSION}'")
  endif()
  message(STATUS "consumer printed: ${out}")
endfunction()

if(MODE STREQUAL "find_package")
  install_qlora()
  cmake_consumer(-DCMAKE_PREFIX_PATH=${prefix})
  # It must be the install that was found, not a system copy or the build tree.
  if(NOT configure_out MATCHES "from ${prefix}/share/cmake/qlora")
    message(FATAL_ERROR "qlora was not found in ${prefix}")
  endif()

elseif(MODE STREQUAL "build_tree")
  cmake_consumer(-Dqlora_DIR=${QLORA_BINARY_DIR})

elseif(MODE STREQUAL "add_subdirectory")
  cmake_consumer(-DQLORA_CONSUMER_MODE=add_subdirectory -DQLORA_ROOT=${QLORA_SOURCE_DIR})

elseif(MODE STREQUAL "version_reject")
  install_qlora()
  # SameMinorVersion while we are 0.x: 0.1 matches; 1.0 and 0.2 must not.
  foreach(wanted 1.0 0.2)
    execute_process(
      COMMAND ${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/reject-${wanted}
              -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
              -DQLORA_REQUIRED_VERSION=${wanted}
      RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
    if(rc EQUAL 0)
      message(FATAL_ERROR "find_package(qlora ${wanted}) succeeded against ${EXPECTED_VERSION}:\n${out}")
    endif()
    # It must have been turned down by the version file, having been found.
    string(FIND "${out}" "${prefix}/share/cmake/qlora/qloraConfig.cmake, version: ${EXPECTED_VERSION}" at)
    if(at EQUAL -1 OR NOT out MATCHES "not accepted")
      message(FATAL_ERROR "find_package(qlora ${wanted}) failed, but not on the version check:\n${out}")
    endif()
    message(STATUS "find_package(qlora ${wanted}) rejected, as it should be")
  endforeach()

elseif(MODE STREQUAL "pkg_config")
  find_program(pkg_config pkg-config NO_CACHE)
  if(NOT pkg_config)
    message("QLORA_SKIP: pkg-config not found")
    return()
  endif()
  install_qlora()
  set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
  run(COMMAND ${pkg_config} --modversion qlora OUTPUT_VAR version)
  string(STRIP "${version}" version)
  if(NOT version STREQUAL EXPECTED_VERSION)
    message(FATAL_ERROR "pkg-config --modversion qlora gave '${version}'")
  endif()
  run(COMMAND ${pkg_config} --cflags --libs qlora OUTPUT_VAR flags)
  string(STRIP "${flags}" flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  string(FIND "${flags}" "-I${prefix}/share/pkgconfig/../../include" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "pkg-config include flag does not point into the install: ${flags}")
  endif()
  set(cxx ${CONSUMER_CXX_COMPILER})
  if(NOT cxx)
    set(cxx c++)
  endif()
  run(COMMAND ${cxx} -std=c++20 ${consumer_src}/main.cpp -o ${WORK_DIR}/consumer ${flags})
  run(COMMAND ${WORK_DIR}/consumer OUTPUT_VAR out)
  check_version_output("${out}")

elseif(MODE STREQUAL "meson_subproject")
  find_program(meson meson NO_CACHE)
  find_program(ninja NAMES ninja ninja-build NO_CACHE)
  if(NOT meson OR NOT ninja)
    message("QLORA_SKIP: meson or ninja not found")
    return()
  endif()
  set(project ${WORK_DIR}/project)
  file(MAKE_DIRECTORY ${project}/subprojects)
  file(COPY ${QLORA_SOURCE_DIR}/tests/install/meson_subproject/meson.build
            ${consumer_src}/main.cpp DESTINATION ${project})
  file(CREATE_LINK ${QLORA_SOURCE_DIR} ${project}/subprojects/qlora SYMBOLIC)
  # A C++ compiler for meson: the one CMake used, unless CXX is set already.
  if(CONSUMER_CXX_COMPILER AND NOT DEFINED ENV{CXX})
    set(ENV{CXX} ${CONSUMER_CXX_COMPILER})
  endif()
  run(COMMAND ${meson} setup ${WORK_DIR}/meson-build --force-fallback-for=qlora
          -Dqlora:cuda=disabled WORKING_DIRECTORY ${project})
  run(COMMAND ${meson} compile -C ${WORK_DIR}/meson-build)
  run(COMMAND ${WORK_DIR}/meson-build/consumer OUTPUT_VAR out)
  check_version_output("${out}")

else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()
