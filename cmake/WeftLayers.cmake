# The layers of docs/ARCHITECTURE.md ("Layers"), in the order of its table: a layer uses only
# itself and the layers before it in this list. The build (src/CMakeLists.txt) gives each layer's
# target an include root holding only those layers, and tests/layers checks every #include against
# this file (and this list against the table of docs/ARCHITECTURE.md).
# Read by CMake projects (include()) and by the scripts of tests/layers (cmake -P).
set(WEFT_LAYERS core store transport comm collectives api data train balance torch launch)

# The layer each public header (include/weft/<name>) belongs to: a header of layer L is visible to
# L and to the layers after it. Every header under include/weft/ must be listed.
set(WEFT_PUBLIC_HEADERS
  errors.h=core
  timeout.h=core
  types.h=core
  version.h=core
  store.h=store
  options.h=comm
  work.h=comm
  communicator.h=api
  init.h=api
  elastic.h=api
  weft.h=api
  data.h=data
  shard_queue.h=data
  train.h=train
  elastic_state.h=train
  checkpoint.h=train
  compress.h=train
  balance.h=balance
  host.h=balance
  torch.h=torch)

# The finer rule of issue 10: the headers of comm see the transports only through their interface
# (transport/transport.h and the engine), never a transport's own folder (transport/tcp/,
# transport/shm/). Checked by tests/layers/check_includes.cmake when ON.
set(WEFT_CHECK_COMM_SEES_TRANSPORT_INTERFACE_ONLY ON)

# weft_layers_visible(<layer> <out-var>): the layers <layer> may use (itself and those before it).
function(weft_layers_visible layer out)
  list(FIND WEFT_LAYERS ${layer} index)
  if(index LESS 0)
    message(FATAL_ERROR "'${layer}' is not a layer of WEFT_LAYERS (cmake/WeftLayers.cmake)")
  endif()
  set(visible "")
  foreach(l IN LISTS WEFT_LAYERS)
    list(APPEND visible ${l})
    if(l STREQUAL layer)
      break()
    endif()
  endforeach()
  set(${out} ${visible} PARENT_SCOPE)
endfunction()

# weft_public_header_layer(<name> <out-var>): the layer of include/weft/<name>, or "" if unlisted.
function(weft_public_header_layer name out)
  set(result "")
  foreach(entry IN LISTS WEFT_PUBLIC_HEADERS)
    string(REPLACE "=" ";" pair "${entry}")
    list(GET pair 0 header)
    list(GET pair 1 layer)
    if(header STREQUAL name)
      set(result ${layer})
    endif()
  endforeach()
  set(${out} "${result}" PARENT_SCOPE)
endfunction()
