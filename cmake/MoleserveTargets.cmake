# Helpers shared by every moleserve target: warnings as errors on our own code only (never on
# generated protobuf code), sanitizers, and the repository root as the include root so that
# includes read "engine/core/status_macros.h".

set(MOLESERVE_SANITIZER_FLAGS "")
if(MOLESERVE_SANITIZE_ADDRESS)
  list(APPEND MOLESERVE_SANITIZER_FLAGS -fsanitize=address -fno-omit-frame-pointer)
endif()
if(MOLESERVE_SANITIZE_UNDEFINED)
  list(APPEND MOLESERVE_SANITIZER_FLAGS -fsanitize=undefined -fno-sanitize-recover=undefined)
endif()
if(MOLESERVE_SANITIZE_THREAD)
  list(APPEND MOLESERVE_SANITIZER_FLAGS -fsanitize=thread)
endif()
if(MOLESERVE_SANITIZER_FLAGS)
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX,C>:${MOLESERVE_SANITIZER_FLAGS}>")
  add_link_options(${MOLESERVE_SANITIZER_FLAGS})
endif()

# moleserve_strict(target): our warning policy.
function(moleserve_strict target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers>
    # GCC 12 at -O3 (Release) reports -Wrestrict on std::string inserts inside libstdc++
    # (GCC PR 105329), a false positive fixed in GCC 13.
    $<$<AND:$<CONFIG:Release>,$<COMPILE_LANG_AND_ID:CXX,GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-restrict>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra --Werror=all-warnings>)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
endfunction()

# moleserve_library(name SOURCES ... [PUBLIC_LINKS ...] [PRIVATE_LINKS ...])
# One library per folder; links are PRIVATE unless a dependency's types appear in our headers.
function(moleserve_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_LINKS;PRIVATE_LINKS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  moleserve_strict(${name})
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC_LINKS} PRIVATE ${ARG_PRIVATE_LINKS})
endfunction()
